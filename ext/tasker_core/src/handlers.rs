//! `TaskerCore::FFI.template_handlers(config)`: the handler classes a worker started with
//! `config` would call, so that `Worker::Bootstrap.start!` can resolve them all before it starts
//! anything. Starts nothing: the templates are loaded and the namespaces chosen exactly as
//! `bootstrap_worker` would, and the config is validated the same way.

use crate::convert;
use crate::errors;
use crate::gvl::without_gvl_retrying;
use magnus::{function, prelude::*, Error, RArray, RModule, Ruby, Value};
use tasker_worker::WorkerBootstrap;

pub fn init(module: RModule) -> Result<(), Error> {
    let ffi = module.define_module("FFI")?;
    ffi.define_singleton_method("template_handlers", function!(template_handlers, -1))
}

/// Array of `{namespace:, name:, version:, step:, callable:}`, one per template step, in the
/// order namespace, template name, version, then the step's place in its template.
fn template_handlers(ruby: &Ruby, args: &[Value]) -> Result<RArray, Error> {
    errors::guard(ruby, || {
        let config = convert::config_from_args(ruby, args)?;
        // Reading template files is I/O: done without the GVL, as bootstrap_worker does.
        let references =
            without_gvl_retrying(ruby, |_| Some(WorkerBootstrap::handler_references(&config)))?
                .map_err(|e| errors::engine(ruby, e))?;

        let array = ruby.ary_new_capa(references.len());
        let [namespace, name, version, step, callable] =
            ["namespace", "name", "version", "step", "callable"].map(|k| ruby.to_symbol(k));
        for reference in references {
            let hash = ruby.hash_new();
            hash.aset(namespace, reference.namespace)?;
            hash.aset(name, reference.name)?;
            hash.aset(version, reference.version)?;
            hash.aset(step, reference.step)?;
            hash.aset(callable, reference.callable)?;
            array.push(hash)?;
        }
        Ok(array)
    })
}
