//! The `signals` thread: SIGINT, SIGTERM and SIGHUP become one message on a
//! channel. Only the first signal matters; later ones are ignored (the Go
//! launcher panicked on a second one).

use std::io;
use std::thread::{self, JoinHandle};

use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

/// The running signal thread. Dropping it stops the thread.
#[derive(Debug)]
pub struct SignalThread {
    /// Receives the number of the first signal.
    pub done: Receiver<i32>,
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

/// Installs the handlers and starts the `signals` thread.
pub fn spawn() -> io::Result<SignalThread> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    let handle = signals.handle();
    let (tx, done) = crossbeam_channel::bounded(1);
    let thread = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                // Full after the first: further signals are dropped on purpose.
                let _ = tx.try_send(s);
            }
        })?;
    Ok(SignalThread {
        done,
        handle,
        thread: Some(thread),
    })
}

impl Drop for SignalThread {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
