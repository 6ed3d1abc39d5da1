// swift-tools-version:5.5
// Swift binding of libphi4: the C API through a system-library target (found with pkg-config).
import PackageDescription

let package = Package(
    name: "Phi4",
    products: [.library(name: "Phi4", targets: ["Phi4"])],
    targets: [
        .systemLibrary(name: "CPhi4", path: "Sources/CPhi4", pkgConfig: "phi4"),
        .target(name: "Phi4", dependencies: ["CPhi4"]),
    ]
)
