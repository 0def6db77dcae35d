//! Running Rust without the GVL, interruptibly and panic-safely.
//!
//! `rb_nogvl` with `RB_NOGVL_INTR_FAIL` so that Ruby never longjmps out of our frame after the
//! call: we check interrupts ourselves, through magnus, once our values are in a safe state.
//!
//! `RB_NOGVL_UBF_ASYNC_SAFE` tells Ruby our unblocking function may run inside a signal handler.
//! Without it, Ruby 3.1 starts a helper thread for every call made from a lone main thread, and
//! joins it afterwards with a check that can raise straight through our frames (skipping the
//! bridge's cleanup: a Ctrl-C during a bootstrap left "another bootstrap is in progress" set for
//! good), costs ~85 µs a call, and livelocks under `GC.stress`. So the unblocking function only
//! does what a signal handler may: an atomic increment and a `write(2)` to a pipe. A relay thread
//! reads the pipe and fires the call's cancel channel, which every wait in the engine selects on,
//! so `Thread#kill`, `Thread#raise`, Ctrl-C and exit still wake it.

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

/// What the unblocking function is given: a cancel channel owned by one Ruby thread, fired by the
/// relay thread.
///
/// Slots are never freed. Ruby's signal handler reads a thread's unblocking function and its
/// argument without a lock, and may call it a moment after the blocking region has ended: memory
/// handed to Ruby as that argument must outlive the call, or a late signal would write into freed
/// memory. So each Ruby thread takes a slot for good (`THREAD_SLOT`); a thread that exits gives
/// it back to `FREE_SLOTS` for the next new thread. A late signal then only fires the channel of
/// a later call on a thread, which takes it as a wait cut short (a wake that raises nothing).
pub(crate) struct CancelSlot {
    sender: Sender<()>,
    receiver: Receiver<()>,
}

impl CancelSlot {
    /// This thread's slot, cleared of cancels left from earlier calls.
    fn for_this_thread() -> &'static CancelSlot {
        let slot = THREAD_SLOT.with(|held| held.0);
        while slot.receiver.try_recv().is_ok() {}
        slot
    }
}

/// Slots of threads that have exited, for reuse (a lock-free queue: never waits).
static FREE_SLOTS: std::sync::LazyLock<(
    Sender<&'static CancelSlot>,
    Receiver<&'static CancelSlot>,
)> = std::sync::LazyLock::new(crossbeam_channel::unbounded);

struct HeldSlot(&'static CancelSlot);

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let _ = FREE_SLOTS.0.send(self.0);
    }
}

thread_local! {
    static THREAD_SLOT: HeldSlot = HeldSlot(FREE_SLOTS.1.try_recv().unwrap_or_else(|_| {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        Box::leak(Box::new(CancelSlot { sender, receiver }))
    }));
}

/// The relay between the async-signal-safe unblocking function and the cancel channels: a pipe
/// carrying `&'static CancelSlot` pointers, and a thread (one per process) that fires them.
mod relay {
    use super::CancelSlot;
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

    const WORD: usize = std::mem::size_of::<usize>();

    static WRITE_FD: AtomicI32 = AtomicI32::new(-1);
    static READ_FD: AtomicI32 = AtomicI32::new(-1);
    static AT_FORK_REGISTERED: AtomicBool = AtomicBool::new(false);

    /// In a forked child the relay thread does not exist, and the inherited pipe is the parent's:
    /// a pointer written there would reach the parent's relay. Forget both; the child's first
    /// call starts its own. Only `close(2)` and atomics: safe in a fork handler.
    extern "C" fn after_fork_child() {
        for fd in [&WRITE_FD, &READ_FD] {
            let fd = fd.swap(-1, Ordering::AcqRel);
            if fd >= 0 {
                // SAFETY: closes this process's copy of a descriptor we created.
                unsafe { libc::close(fd) };
            }
        }
    }

    /// Start the relay if this process has none. Called by Ruby threads holding the GVL, which
    /// serialises them: no lock needed.
    pub fn ensure_started() -> Result<(), String> {
        if WRITE_FD.load(Ordering::Acquire) >= 0 {
            return Ok(());
        }
        if !AT_FORK_REGISTERED.swap(true, Ordering::AcqRel) {
            // SAFETY: registers a handler that only closes descriptors and stores to atomics.
            unsafe { libc::pthread_atfork(None, None, Some(after_fork_child)) };
        }
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` has room for the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!(
                "cannot create the interrupt relay pipe: {}",
                std::io::Error::last_os_error()
            ));
        }
        let [read_fd, write_fd] = fds;
        // A full pipe must never block a signal handler: the write end does not block.
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(write_fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let spawned = std::thread::Builder::new()
            .name("tasker-interrupts".into())
            .spawn(move || run(read_fd));
        if let Err(e) = spawned {
            // SAFETY: closing the descriptors just created, which nothing else has seen.
            unsafe {
                libc::close(read_fd);
                libc::close(write_fd);
            }
            return Err(format!("cannot start the interrupt relay thread: {e}"));
        }
        READ_FD.store(read_fd, Ordering::Release);
        WRITE_FD.store(write_fd, Ordering::Release);
        Ok(())
    }

    fn run(read_fd: libc::c_int) {
        // Signals are for Ruby's threads: Ruby's handler must not run on this one.
        // SAFETY: fills and applies a signal mask for this thread only.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        }
        let mut word = [0u8; WORD];
        loop {
            // Every write is one whole word (atomic, under PIPE_BUF), so reads are whole words.
            // SAFETY: reads into a buffer of exactly WORD bytes.
            let n = unsafe { libc::read(read_fd, word.as_mut_ptr() as *mut c_void, WORD) };
            if n == WORD as isize {
                // SAFETY: `signal` wrote the address of a slot, and slots are never freed.
                let slot = unsafe { &*(usize::from_ne_bytes(word) as *const CancelSlot) };
                let _ = slot.sender.try_send(());
            } else if n < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            {
                continue;
            } else {
                // The descriptor was closed (a forked child): nothing more will come.
                return;
            }
        }
    }

    /// Async-signal-safe: an atomic load and one `write(2)`; errno is kept.
    ///
    /// # Safety
    /// `slot` must point to a `CancelSlot` (they live for the whole process).
    pub unsafe fn signal(slot: *const CancelSlot) {
        // SAFETY: errno is thread-local; we put back what the interrupted code had.
        let errno = unsafe { *libc::__errno_location() };
        let fd = WRITE_FD.load(Ordering::Acquire);
        let word = (slot as usize).to_ne_bytes();
        if fd >= 0 {
            // A full pipe drops the wake: the relay is behind, and has this slot's cancel queued.
            // SAFETY: writes WORD bytes from a live buffer.
            unsafe { libc::write(fd, word.as_ptr() as *const c_void, WORD) };
        }
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
    }
}

/// Start the relay at load, so that the process's thread count does not change later.
pub fn init(ruby: &Ruby) -> Result<(), Error> {
    relay::ensure_started().map_err(|e| crate::errors::ffi(ruby, e))
}

unsafe extern "C" fn unblock(data: *mut c_void) {
    // SAFETY: `data` is a `CancelSlot`, which is never freed.
    unsafe { relay::signal(data as *const CancelSlot) };
}

/// Run `work` with the GVL released. `work` gets a cancel receiver to select on.
///
/// Returns `Ok(None)` when Ruby had an interrupt pending and `work` never ran (the caller
/// should treat it like a cancelled wait). A panic in `work` becomes `TaskerCore::FFIError`.
pub fn without_gvl<F, R>(ruby: &Ruby, work: F) -> Result<Option<R>, Error>
where
    F: FnOnce(&Receiver<()>) -> R,
{
    relay::ensure_started().map_err(|e| crate::errors::ffi(ruby, e))?;
    let slot = CancelSlot::for_this_thread();
    let mut call = Call {
        work: Some(work),
        cancel: slot.receiver.clone(),
        outcome: None,
    };
    let flags = (rb_sys::RB_NOGVL_INTR_FAIL | rb_sys::RB_NOGVL_UBF_ASYNC_SAFE) as libc::c_int;
    // SAFETY: `call` stays valid until the call returns; the slot lives for the whole process
    // (Ruby may call the ubf a moment after the call), and the ubf only writes its address to
    // the relay's pipe (`relay::signal`, async-signal-safe).
    unsafe {
        rb_sys::rb_nogvl(
            Some(trampoline::<F, R>),
            &mut call as *mut Call<F, R> as *mut c_void,
            Some(unblock),
            slot as *const CancelSlot as *mut c_void,
            flags,
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
/// Runs under `rb_protect` (magnus), so a raise comes back as an `Err`, never as a longjmp.
pub fn check_interrupts(ruby: &Ruby) -> Result<(), Error> {
    ruby.thread_check_ints()
}

/// Write a log line from a Ruby thread without holding the GVL: writing takes stderr's lock and
/// may wait as long as stderr is slow (a full pipe), which with the GVL held would freeze every
/// Ruby thread. If Ruby has an interrupt pending (so the GVL cannot be released for it), the line
/// is written by a short-lived thread of its own instead; the interrupt stays for the caller.
pub fn log_without_gvl<F>(ruby: &Ruby, emit: F)
where
    F: FnOnce() + Send + 'static,
{
    let mut emit = Some(emit);
    let ran = matches!(
        without_gvl(ruby, |_| {
            if let Some(emit) = emit.take() {
                emit();
            }
        }),
        Ok(Some(()))
    );
    if !ran {
        if let Some(emit) = emit.take() {
            let _ = std::thread::Builder::new()
                .name("tasker-log".into())
                .spawn(emit);
        }
    }
}
