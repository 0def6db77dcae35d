//! The PyO3 bridge: `tasker_core._tasker_core`, re-exported by the pure-Python `tasker_core`
//! package. Converts, maps errors, waits with the GIL released. No workflow logic lives here;
//! that is the `tasker_worker` crate, shared with the Ruby bridge.
//!
//! Rules every function here keeps: each wait runs with the GIL released and wakes for Ctrl-C
//! (see `wait`); a panic becomes `FFIError` (see `errors::guard`); no Rust thread ever calls
//! Python (the engine's log lines are carried to a Python thread, see `logging`).

mod convert;
mod errors;
mod logging;
mod tasks;
mod wait;
mod worker;

use pyo3::prelude::*;

#[pymodule]
fn _tasker_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    logging::register(m)?;
    worker::register(m)?;
    tasks::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
