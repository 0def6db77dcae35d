//! Running Rust without the GVL, interruptibly and panic-safely.
//!
//! `rb_thread_call_without_gvl2` (not the plain variant) so that Ruby never longjmps out of
//! our frame after the call: we check interrupts ourselves, through magnus, once our values
//! are in a safe state. The unblocking function fires a per-call cancel channel that every
//! wait in the engine selects on, so `Thread#kill`, `Thread#raise`, Ctrl-C and exit wake it.

use crossbeam_channel::{Receiver, Sender};
use magnus::{Error, Ruby};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

struct Call<F, R> {
    work: Option<F>,
    cancel: Receiver<()>,
    outcome: Option<std::thread::Result<R>>,
}

unsafe extern "C" fn trampoline<F, R>(data: *mut c_void) -> *mut c_void
where
    F: FnOnce(&Receiver<()>) -> R,
{
    // SAFETY: `data` is the `Call` that `without_gvl` keeps alive on its stack for this call.
    let call = unsafe { &mut *(data as *mut Call<F, R>) };
    if let Some(work) = call.work.take() {
        let cancel = &call.cancel;
        call.outcome = Some(catch_unwind(AssertUnwindSafe(|| work(cancel))));
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn unblock(data: *mut c_void) {
    // SAFETY: `data` is the cancel sender that outlives the blocking region.
    let cancel = unsafe { &*(data as *const Sender<()>) };
    let _ = cancel.try_send(());
}

/// Run `work` with the GVL released. `work` gets a cancel receiver to select on.
///
/// Returns `Ok(None)` when Ruby had an interrupt pending and `work` never ran (the caller
/// should treat it like a cancelled wait). A panic in `work` becomes `TaskerCore::FFIError`.
pub fn without_gvl<F, R>(ruby: &Ruby, work: F) -> Result<Option<R>, Error>
where
    F: FnOnce(&Receiver<()>) -> R,
{
    let (cancel_tx, cancel_rx) = crossbeam_channel::bounded::<()>(1);
    let mut call = Call {
        work: Some(work),
        cancel: cancel_rx,
        outcome: None,
    };
    // SAFETY: both pointers stay valid until the call returns; the ubf only touches the sender.
    unsafe {
        rb_sys::rb_thread_call_without_gvl2(
            Some(trampoline::<F, R>),
            &mut call as *mut Call<F, R> as *mut c_void,
            Some(unblock),
            &cancel_tx as *const Sender<()> as *mut c_void,
        );
    }
    match call.outcome {
        Some(Ok(value)) => Ok(Some(value)),
        Some(Err(panic)) => Err(crate::errors::panic_error(ruby, panic)),
        None => Ok(None),
    }
}

/// [`without_gvl`] for work that must run to its end. `work` returns `None` when its wait was
/// cancelled. Whenever `work` did not run (Ruby had an interrupt flag set on entry) or was
/// cancelled, pending interrupts are handled: one that raises (`Thread#kill`, `Thread#raise`,
/// Ctrl-C) is returned as the error; one that raises nothing (a timer tick from another thread
/// wanting the GVL, SIGCHLD, a trap that returned, `Thread#wakeup`) just runs `work` again.
pub fn without_gvl_retrying<F, R>(ruby: &Ruby, mut work: F) -> Result<R, Error>
where
    F: FnMut(&Receiver<()>) -> Option<R>,
{
    loop {
        match without_gvl(ruby, |cancel| work(cancel))? {
            Some(Some(value)) => return Ok(value),
            Some(None) | None => check_interrupts(ruby)?,
        }
    }
}

/// After a cancelled wait: let Ruby raise whatever interrupted us (kill, Ctrl-C, `Thread#raise`).
/// Returns normally for interrupts that raise nothing (`Thread#wakeup`, a trap that returned).
pub fn check_interrupts(ruby: &Ruby) -> Result<(), Error> {
    ruby.thread_check_ints()
}
