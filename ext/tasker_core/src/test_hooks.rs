//! Hooks for the specs and benchmarks, built only with the `test-hooks` cargo feature (`rake
//! compile` turns it on; an installed gem does not have them): `TaskerCore::FFI.__provoke_panic`
//! `TaskerCore::FFI.__measure_thread_wake` and `TaskerCore::FFI.__hold_gvl`.

use crate::errors;
use crate::gvl::{without_gvl, without_gvl_retrying};
use magnus::{function, prelude::*, Error, RModule, Ruby};
use std::time::Duration;
use tasker_worker::dispatch::WakeShape;

/// The most samples one `__measure_thread_wake` call takes (each is 8 bytes, and one wake-up).
const MAX_SAMPLES: usize = 1_000_000;
/// The longest one `__measure_thread_wake` call may sleep in total (it cannot be interrupted).
const MAX_MEASUREMENT: Duration = Duration::from_secs(60);

pub fn init(ffi: RModule) -> Result<(), Error> {
    ffi.define_singleton_method("__provoke_panic", function!(provoke_panic, 1))?;
    ffi.define_singleton_method("__measure_thread_wake", function!(measure_thread_wake, 3))?;
    ffi.define_singleton_method("__hold_gvl", function!(hold_gvl, 1))?;
    Ok(())
}

/// Panic inside the bridge ("gvl") or inside a GVL-released section ("no_gvl"), to show that a
/// panic reaches Ruby as `TaskerCore::FFIError` and nothing worse.
fn provoke_panic(ruby: &Ruby, place: String) -> Result<(), Error> {
    errors::guard(ruby, || match place.as_str() {
        "gvl" => panic!("provoked panic with the GVL held"),
        "no_gvl" => {
            without_gvl_retrying(ruby, |_| -> Option<()> {
                panic!("provoked panic without the GVL")
            })?;
            Ok(())
        }
        other => Err(errors::argument(
            ruby,
            format!("unknown place {other:?} (gvl or no_gvl)"),
        )),
    })
}

/// The longest `__hold_gvl` spins.
const MAX_GVL_HOLD: Duration = Duration::from_secs(10);

/// Spin on the CPU for `seconds` (at most `MAX_GVL_HOLD`) without ever releasing the GVL: stands
/// in for a C extension call that never releases it, so that a spec can show that the web API
/// answers all the same (no Ruby thread runs meanwhile, not even to take a signal).
fn hold_gvl(seconds: f64) {
    let hold = Duration::from_secs_f64(seconds.clamp(0.0, MAX_GVL_HOLD.as_secs_f64()));
    let until = std::time::Instant::now() + hold;
    while std::time::Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// For the dispatch-latency benchmark: wake-up latencies (ns) of a plain Rust thread waiting the
/// way handler threads wait, `samples` times, `gap_seconds` apart, woken in `shape` ("pair" or
/// "engine", see `WakeShape`). Runs with the GVL released; bounded (at most `MAX_SAMPLES`
/// samples and `MAX_MEASUREMENT` of gaps) since the measurement does not stop for interrupts.
fn measure_thread_wake(
    ruby: &Ruby,
    samples: usize,
    gap_seconds: f64,
    shape: String,
) -> Result<Vec<u64>, Error> {
    errors::guard(ruby, || {
        let shape = match shape.as_str() {
            "pair" => WakeShape::Pair,
            "engine" => WakeShape::Engine,
            other => {
                return Err(errors::argument(
                    ruby,
                    format!("unknown shape {other:?} (pair or engine)"),
                ))
            }
        };
        if samples > MAX_SAMPLES {
            return Err(errors::argument(
                ruby,
                format!("samples must be at most {MAX_SAMPLES}, got {samples}"),
            ));
        }
        let gap = Duration::from_secs_f64(gap_seconds.clamp(0.0, 1.0));
        if gap.saturating_mul(samples as u32) > MAX_MEASUREMENT {
            return Err(errors::argument(
                ruby,
                format!(
                    "samples x gap_seconds must be at most {}s",
                    MAX_MEASUREMENT.as_secs()
                ),
            ));
        }
        let latencies = without_gvl(ruby, |_| {
            tasker_worker::dispatch::measure_thread_wake(samples, gap, shape)
        })?;
        Ok(latencies.unwrap_or_default())
    })
}
