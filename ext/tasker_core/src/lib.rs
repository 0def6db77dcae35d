//! The magnus bridge: `TaskerCore::FFI`. Converts, maps errors, waits without the GVL.
//! No workflow logic lives here; that is the `tasker_worker` crate.

mod bridge;
mod convert;
mod definitions;
mod errors;
mod gvl;
mod handlers;
mod logging;
mod task_list;
mod tasks;
#[cfg(feature = "test-hooks")]
mod test_hooks;
mod testing;
mod web;

use magnus::{Error, Ruby};

#[magnus::init]
fn init(ruby: &Ruby) -> Result<(), Error> {
    let module = ruby.define_module("TaskerCore")?;
    errors::define(ruby, module)?;
    errors::install_panic_hook();
    bridge::init(ruby, module)?;
    handlers::init(module)?;
    task_list::init(module)?;
    web::init(module)?;
    testing::init(module)
}
