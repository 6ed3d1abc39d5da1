//! The graph allocator: one compute buffer, planned once, reused by every graph.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::buffer::{AllocError, BufferType};
use super::graph::GraphRef;

/// Graph allocator: plans and reuses one compute buffer for intermediate tensors.
pub struct Allocator(NonNull<sys::ggml_gallocr>);
// SAFETY: used by one session at a time (&mut self).
unsafe impl Send for Allocator {}

impl Drop for Allocator {
    fn drop(&mut self) {
        // SAFETY: created by ggml_gallocr_new, freed once.
        unsafe { sys::ggml_gallocr_free(self.0.as_ptr()) }
    }
}

impl Default for Allocator {
    fn default() -> Allocator {
        Allocator::new()
    }
}

impl Allocator {
    pub fn new() -> Allocator {
        // SAFETY: the CPU buffer type is static.
        let a = unsafe { sys::ggml_gallocr_new(BufferType::cpu().0) };
        Allocator(NonNull::new(a).expect("ggml_gallocr_new returned null"))
    }

    /// Size the compute buffer for the largest graph this allocator will see.
    pub fn reserve(&mut self, g: GraphRef<'_>) -> Result<(), AllocError> {
        // SAFETY: valid allocator and graph; a false return means the buffer could not be had.
        if unsafe { sys::ggml_gallocr_reserve(self.0.as_ptr(), g.graph.as_ptr()) } {
            return Ok(());
        }
        // The size it needed, for the message (planned again without allocating).
        Err(AllocError {
            what: "the compute buffer".into(),
            bytes: self.measure(g),
        })
    }

    /// Bytes the compute buffer needs for `g`, planned without allocating anything.
    pub fn measure(&mut self, g: GraphRef<'_>) -> usize {
        let mut bytes = 0usize;
        // SAFETY: one buffer type, so one size is written; NULL ids mean "all in buffer 0".
        unsafe {
            sys::ggml_gallocr_reserve_n_size(
                self.0.as_ptr(),
                g.graph.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                &mut bytes,
            )
        };
        bytes
    }

    pub fn alloc(&mut self, g: GraphRef<'_>) -> Result<(), AllocError> {
        // SAFETY: valid allocator and graph.
        if unsafe { sys::ggml_gallocr_alloc_graph(self.0.as_ptr(), g.graph.as_ptr()) } {
            Ok(())
        } else {
            Err(AllocError {
                what: "the compute buffer".into(),
                bytes: self.size(),
            })
        }
    }

    pub fn size(&self) -> usize {
        // SAFETY: valid allocator; buffer 0 is the only one.
        unsafe { sys::ggml_gallocr_get_buffer_size(self.0.as_ptr(), 0) }
    }
}
