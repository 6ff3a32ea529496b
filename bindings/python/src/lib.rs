//! `wrenn_embed._native`: the Rust half of the Python binding.
//!
//! The Python package (`python/wrenn_embed/`) gives the API its shape (the
//! reference Wrenn SDK's `Capsule`, `commands`, `files`, `AsyncCapsule`); this
//! module does the work. Every operation runs as a task on the binding's own
//! multi-thread tokio runtime and returns a [`Pending`]: the sync API waits on it
//! with the GIL released (checking for Ctrl-C every 50 ms), the asyncio API is
//! woken by a done-callback. Errors cross as `(kind, message)` and become Python
//! exceptions in one place (`wrenn_embed._errors.from_kind`).
//!
//! Ownership: a created capsule is held by an [`Owned`] (shared by every Python
//! object bound to it through [`Handle`]); when the last one is dropped without an
//! explicit destroy, the capsule is destroyed on the runtime. Nothing here blocks
//! in a destructor, so a garbage collection with the GIL held cannot deadlock.

mod ops;
mod pending;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<pending::Pending>()?;
    m.add_class::<ops::Handle>()?;
    m.add_class::<ops::Process>()?;
    ops::register(m)?;
    Ok(())
}
