//! A mapped input that shrinks while we read it: an error naming the file,
//! not a dead process.
//!
//! Reading a page of a file mapping past the file's end raises SIGBUS, whose
//! default action kills the process with no message (exit 135): what a user
//! saw when another program truncated an input mid-run. Programs that map
//! files they do not control (LMDB's readers, Go's `SetPanicOnFault`, Java's
//! `MappedByteBuffer`) turn that fault into an error; so does this module.
//!
//! Each input mapping is registered in a fixed table. The SIGBUS handler looks
//! the faulting address up there; for one of ours it maps a page of zeros over
//! the missing page (so the faulting read completes and the worker carries
//! on), and flags the mapping. The executor checks the flags when a shard's
//! chunks are done and fails with [`crate::error::Error::SourceChanged`] naming the
//! file, before the shard is committed. A fault anywhere else goes to the
//! handler that was installed before ours (Python's `faulthandler`, or the
//! default action), exactly as if we were not there.
//!
//! What the kernel reads from a mapping on our behalf (a `pwrite` straight
//! from the map) fails with `EFAULT` rather than faulting: the executor
//! checks the inputs' sizes when a write fails, and reports the shrunk input.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Mappings watched at once; more are read unwatched (as before this module).
const SLOTS: usize = 1024;

/// One registered mapping: `[start, end)`, 0..0 when free.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // a template for the array below
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// The handler that was installed before ours, and the page size, set once
/// before our handler is.
struct Installed {
    previous: libc::sigaction,
    page: usize,
}

// SAFETY: `previous` is plain data (function pointers and flags) written once
// before any reader can see it, and only read after.
unsafe impl Sync for Installed {}
// SAFETY: as above.
unsafe impl Send for Installed {}

static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();

/// A registered mapping; unregistered when dropped.
pub(super) struct Watch {
    slot: Option<usize>,
}

impl Watch {
    /// Watch `range` (a live mapping) for faults. Unwatched when the handler
    /// cannot be installed or every slot is taken.
    pub(super) fn new(range: &[u8]) -> Watch {
        if range.is_empty() || install().is_none() {
            return Watch { slot: None };
        }
        let (start, end) = (
            range.as_ptr() as usize,
            range.as_ptr() as usize + range.len(),
        );
        for (i, slot) in TABLE.iter().enumerate() {
            // Claim a free slot by its `end` (0: free), then publish `start`.
            if slot
                .end
                .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.faulted.store(false, Ordering::Relaxed);
                slot.start.store(start, Ordering::Release);
                slot.end.store(end, Ordering::Release);
                return Watch { slot: Some(i) };
            }
        }
        Watch { slot: None }
    }

    /// Whether a read of the mapping faulted (the file shrank under it).
    pub(super) fn faulted(&self) -> bool {
        self.slot
            .is_some_and(|i| TABLE[i].faulted.load(Ordering::Acquire))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let slot = &TABLE[i];
            slot.start.store(0, Ordering::Release);
            slot.end.store(0, Ordering::Release);
        }
    }
}

/// Install the handler once; None where it could not be.
fn install() -> Option<&'static Installed> {
    INSTALLED.get_or_init(install_handler).as_ref()
}

fn install_handler() -> Option<Installed> {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => return None,
    };
    // SAFETY: zeroed sigaction structs are valid (no handler, empty mask);
    // sigaction reads `ours` and writes `previous`, both live locals.
    unsafe {
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
            return None;
        }
        // Published before the handler can run: it reads `previous`.
        let installed = Installed { previous, page };
        let mut ours: libc::sigaction = std::mem::zeroed();
        ours.sa_sigaction = on_sigbus as *const () as usize;
        ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut ours.sa_mask);
        // The handler finds `INSTALLED` set: `get_or_init` stores our return
        // value before anyone can fault on a watched mapping (no slot is
        // registered until `install` has returned).
        if libc::sigaction(libc::SIGBUS, &ours, std::ptr::null_mut()) != 0 {
            return None;
        }
        Some(installed)
    }
}

/// The SIGBUS handler: async-signal-safe (atomics, `mmap`, `sigaction`).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let installed = INSTALLED.get().and_then(Option::as_ref);
    if let Some(Installed { page, .. }) = installed {
        for slot in &TABLE {
            let (start, end) = (
                slot.start.load(Ordering::Acquire),
                slot.end.load(Ordering::Acquire),
            );
            if start <= addr && addr < end && end != usize::MAX {
                let at = addr & !(page - 1);
                // SAFETY: `at` is the page of a live read-only mapping of
                // ours that faulted; replacing it with a private page of
                // zeros changes no memory anyone else owns, and the mapping
                // is unmapped whole when its `Input` is dropped.
                let mapped = unsafe {
                    libc::mmap(
                        at as *mut libc::c_void,
                        *page,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if mapped != libc::MAP_FAILED {
                    slot.faulted.store(true, Ordering::Release);
                    return; // the read is retried, and reads zeros
                }
            }
        }
    }
    // Not ours: whoever was there before us handles it.
    let Some(Installed { previous, .. }) = installed else {
        return reset_and_return(sig);
    };
    let handler = previous.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        return reset_and_return(sig);
    }
    // SAFETY: `handler` is the function the previous sigaction installed,
    // called with the signature its flags say it has.
    unsafe {
        if previous.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(handler);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            f(sig);
        }
    }
}

/// Restore the default action: the faulting instruction runs again, faults
/// again, and the process dies as it would have without us.
fn reset_and_return(sig: libc::c_int) {
    // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask.
    unsafe {
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &default, std::ptr::null_mut());
    }
}
