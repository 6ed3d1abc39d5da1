import CPhi4

/// A failed phi4 call.
public struct Phi4Error: Error, CustomStringConvertible {
    public let status: phi4_status
    public let message: String
    public var description: String { "phi4 error \(status.rawValue): \(message)" }
}

/// A loaded model (immutable; share it between sessions and threads).
public final class Model {
    let handle: OpaquePointer

    public init(path: String) throws {
        var m: OpaquePointer?
        let st = phi4_model_load(path, nil, &m)
        guard st == PHI4_OK, let m = m else {
            throw Phi4Error(status: st, message: String(cString: phi4_last_error()))
        }
        handle = m
    }

    deinit { phi4_model_free(handle) }
}

/// One conversation; use it from one thread at a time.
public final class Session {
    let handle: OpaquePointer
    let model: Model

    public init(model: Model) throws {
        var s: OpaquePointer?
        let st = phi4_session_new(model.handle, nil, &s)
        guard st == PHI4_OK, let s = s else {
            throw Phi4Error(status: st, message: String(cString: phi4_last_error()))
        }
        handle = s
        self.model = model
    }

    deinit { phi4_session_free(handle) }

    /// Safe from any thread.
    public func cancel() { phi4_session_cancel(handle) }

    /// Reply to `messages` (role, content), streaming text to `onPiece` (return false to cancel).
    public func chat(_ messages: [(role: String, content: String)], onPiece: @escaping (String) -> Bool) throws -> phi4_result {
        final class Box { let f: (String) -> Bool; init(_ f: @escaping (String) -> Bool) { self.f = f } }
        let box = Unmanaged.passRetained(Box(onPiece))
        defer { box.release() }
        let roles = messages.map { strdup($0.role) }
        let contents = messages.map { strdup($0.content) }
        defer { (roles + contents).forEach { free($0) } }
        var msgs = zip(roles, contents).map { phi4_message(role: $0, content: $1) }
        let st = phi4_session_chat(handle, &msgs, msgs.count, nil, { user, piece, len in
            let f = Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue().f
            let bytes = UnsafeRawBufferPointer(start: piece, count: len)
            return f(String(decoding: bytes, as: UTF8.self))
        }, box.toOpaque())
        guard st == PHI4_OK else {
            throw Phi4Error(status: st, message: String(cString: phi4_session_last_error(handle)))
        }
        var r = phi4_result()
        r.struct_size = MemoryLayout<phi4_result>.size
        phi4_session_last_result(handle, &r)
        return r
    }
}
