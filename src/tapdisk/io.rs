//! The I/O engine: io_uring or Linux AIO submitted from the event loop for plain reads and
//! writes, a small pool of worker threads for everything that needs blocking work, so the
//! loop never waits on a disk.
//!
//! ```text
//!  loop --submit--> Image::direct_map? --yes--> [encrypt in place] submit (aio::Engine:
//!                         | no                                  |  io_uring or Linux AIO)
//!                         v                  refused for now    |           | kernel: eventfd
//!                      [queue] <-- (EAGAIN, ...): the rest -----+           |
//!                         +--> worker 1..N: image.read/write_in_place/flush/...,
//!                              or a refused transfer's pread/pwrite at the mapped offset
//!  loop <--eventfd (Waker)-- completions(): reap (resubmit short, decrypt), workers'
//!                         |  a write mapped with `commit` (VHD: new bitmap bits)
//!                         +--> per image, one batch at a time --> worker: commit_writes
//!                              (one fdatasync, then the bitmaps in one AIO batch) --> completions
//! ```
//!
//! Fast path: a read or a non-FUA write that the image maps onto one run of one file
//! taking asynchronous I/O ([`Image::direct_map`]: raw images, and VHD blocks that are
//! allocated with every bitmap bit of the range set, so nothing else has to happen; for a
//! write, with the block's bitmap on disk as cached, not being written; or, flagged
//! `commit`, a write that needs a commit afterwards: see below) is
//! submitted right away from the loop, its page-aligned buffer going to the `O_DIRECT`
//! descriptor as it is; an encrypted layer's write is encrypted in place first and a read
//! decrypted after completion, on the loop. Completions signal the engine's eventfd (the
//! same the workers use) and are reaped by [`IoEngine::completions`]: a short transfer is
//! resubmitted for the rest, no progress (end of file for a read, ENOSPC for a write) or a
//! negative result is that request's error. Up to [`AIO_DEPTH`] requests are in flight;
//! beyond that, requests go to the workers. Flush stays a worker `fdatasync`: a flush is
//! started only after the writes it covers completed (the ring's drain point; NBD clients
//! wait for replies), and an asynchronous write completes only once it is in the file.
//!
//! Writes that need metadata after their data: a VHD write to an allocated block whose
//! bitmap is cached but whose bits for the range are not all set (the first write to
//! those sectors), or whose bitmap or BAT sector write is still running or failed, and a
//! block's first write while the reserve has room (the image allocates the block in
//! memory), is mapped with [`DirectMap::commit`] set. Its data goes out from the loop like any other; once it
//! completed it is not acknowledged but queued for its image's commit, and a worker runs
//! [`Image::commit_writes`] for a batch: every such write of that image that completed
//! meanwhile, with one `fdatasync` for all of them, then each block's bitmap once, all of
//! them submitted together in one Linux AIO batch (`BlockFile::write_many`;
//! crash-consistency invariant 2 in `image::vhd::engine`), and completes each write with
//! its own result. One batch per image runs at a time; the writes that complete while it
//! runs form the next, so under load one sync covers every write in flight. Only the
//! commit runs on a worker: Linux AIO cannot submit an `fdatasync` for ext4
//! before Linux 4.18 (OpenXT 8 runs 4.14), and it must come between data and bitmap.
//!
//! Errors at submission: when the kernel refuses a submission for now (EAGAIN, ENOMEM,
//! EBUSY, EINTR: short of resources; `refused_for_now`), be it a request's first or the
//! rest of a short transfer, a worker does the transfer instead: it moves what is left of
//! the prepared buffer at the mapped file offset with `pread`/`pwrite` (an encrypted
//! write's buffer is already encrypted and is not encrypted again) and completes the
//! request as the engine would (decrypting a read). A warning at the 1st, 10th, 100th, ...
//! refusal of an engine says so. Any other submission error (EBADF, EINVAL, ...) is the
//! request's error, as a failed completion is.
//!
//! Engine choice ([`EngineChoice`], `TAPDISK3_IO=uring|aio|threads|auto`, or
//! `TAPDISK3_AIO=0` for `threads`): the interfaces of the choice are tried in order, io_uring
//! (Linux 5.6 and later) then Linux AIO, and the first that sets up runs; when none does
//! (`ENOSYS` on 4.14 for io_uring, `EPERM` where `kernel.io_uring_disabled` or seccomp
//! forbids it), everything goes to the workers. One log line says which engine runs and why
//! the others did not. The default ([`DEFAULT_ORDER`]) is Linux AIO: io_uring did not
//! measure better on this path (ARCHITECTURE.md, "I/O engine").
//!
//! Workers: VHD allocation that must grow the reserve, commits, writes whose block's
//! bitmap is not cached yet, reads through parents, FUA writes, discard, zeroing, block status,
//! flush, and the OPEN/CLOSE tasks; all reads and writes of images whose files cannot
//! take asynchronous I/O (buffered, not memory-backed). Images
//! are `Send + Sync` with `&self` methods, so requests on one image run concurrently. The
//! tag is opaque to the engine: the loop uses it to route the completion (an NBD connection
//! and cookie, a VBD open, ...). Completions for things that went away meanwhile are simply
//! dropped by the loop.
//!
//! Inline path: reads and writes up to [`INLINE_MAX`] and flushes on an image whose whole
//! chain is [memory-backed](Image::memory_backed) (tmpfs, ramfs) run on the submitting
//! thread, the loop, before the asynchronous engine is considered (`TAPDISK3_INLINE_IO=0`
//! turns it off; such images then use the engine, whose buffered submissions complete
//! inside the submission). It still earns its place on tmpfs: answered in the same loop
//! pass with no eventfd round trip, raw 4 KiB reads at QD1 cost 5.2 us of tapdisk CPU each
//! against 6.4 us through AIO, and ran at 2.2x against 1.4x qemu-nbd (scripts/bench-nbd.sh,
//! /dev/shm, one shared CPU, 2 reps, a loaded machine). On ext4 with `O_DIRECT` it never
//! applies.
//!
//! Pool size: [`DEFAULT_THREADS`] = 4, override with `TAPDISK3_IO_THREADS`: outstanding
//! blocking requests in the kernel for the work the asynchronous engine does not take.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use log::{info, warn};

use crate::aio;
use crate::image::{DirectMap, Extent, Image, ImageError, SECTOR_SIZE};
use crate::util::AlignedBuf;

use super::reactor::Waker;

/// Worker threads when nothing else is configured.
pub const DEFAULT_THREADS: usize = 4;
/// Asynchronous requests in flight per process (the io_uring's or AIO context's depth).
pub const AIO_DEPTH: u32 = 256;

/// The kernel interfaces tried, in this order, when nothing is configured
/// ([`EngineChoice::Auto`]).
pub const DEFAULT_ORDER: &[aio::Kind] = &[aio::Kind::Aio];

/// Which engine takes the reads and writes that [`Image::direct_map`] maps
/// (`TAPDISK3_IO`). The worker threads take everything else, and everything when no
/// asynchronous engine can be set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// [`DEFAULT_ORDER`], then the workers.
    #[default]
    Auto,
    /// io_uring, then Linux AIO, then the workers.
    Uring,
    /// Linux AIO, then the workers.
    Aio,
    /// The workers only.
    Threads,
}

/// A `TAPDISK3_IO` value that names no engine.
#[derive(Debug, thiserror::Error)]
#[error("TAPDISK3_IO={0:?}: expected uring, aio, threads or auto")]
pub struct UnknownEngine(pub String);

impl EngineChoice {
    /// The asynchronous interfaces to try, in order.
    pub fn order(self) -> &'static [aio::Kind] {
        match self {
            EngineChoice::Auto => DEFAULT_ORDER,
            EngineChoice::Uring => &[aio::Kind::Uring, aio::Kind::Aio],
            EngineChoice::Aio => &[aio::Kind::Aio],
            EngineChoice::Threads => &[],
        }
    }

    /// From the environment: `TAPDISK3_IO` (`uring`, `aio`, `threads`, `auto`) when set,
    /// else `TAPDISK3_AIO` (off: the workers only; its meaning before `TAPDISK3_IO`).
    pub fn from_env(
        io: Option<&std::ffi::OsStr>,
        aio_switch: Option<&std::ffi::OsStr>,
    ) -> Result<EngineChoice, UnknownEngine> {
        let Some(v) = io else {
            return Ok(if crate::util::switched_on(aio_switch) {
                EngineChoice::Auto
            } else {
                EngineChoice::Threads
            });
        };
        let v = v.to_string_lossy();
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(EngineChoice::Auto),
            "uring" | "io_uring" => Ok(EngineChoice::Uring),
            "aio" => Ok(EngineChoice::Aio),
            "threads" | "workers" => Ok(EngineChoice::Threads),
            _ => Err(UnknownEngine(v.into_owned())),
        }
    }
}

/// Sets up one asynchronous interface (the real one, or a failing one in tests).
type Setup<'a, J> =
    &'a dyn Fn(aio::Kind, std::os::fd::BorrowedFd<'_>) -> std::io::Result<aio::Engine<J>>;

/// The first interface of `order` that sets up, and the log line that says what runs
/// (with why the ones before it did not).
fn start_async<J>(
    order: &[aio::Kind],
    notify: std::os::fd::BorrowedFd<'_>,
    setup: Setup<'_, J>,
) -> (Option<aio::Engine<J>>, String) {
    let mut refused = Vec::new();
    for kind in order {
        match setup(*kind, notify) {
            Ok(e) => {
                let mut line = format!(
                    "I/O engine: {} from the event loop for mapped reads and writes",
                    kind.name()
                );
                if !refused.is_empty() {
                    line += &format!(" ({} unavailable)", refused.join("; "));
                }
                return (Some(e), line);
            }
            Err(e) => refused.push(format!("{}: {e}", kind.name())),
        }
    }
    let line = if refused.is_empty() {
        "I/O engine: worker threads for every read and write (switched off)".to_string()
    } else {
        format!(
            "I/O engine: worker threads for every read and write ({} unavailable)",
            refused.join("; ")
        )
    };
    (None, line)
}

/// Largest read or write run inline on a memory-backed image. Bigger transfers go to the
/// workers, so that copying (and encrypting) them can use other CPUs.
pub const INLINE_MAX: usize = 1 << 20;
/// A zero-filled buffer for WRITE_ZEROES, written in pieces of this size.
const ZERO_CHUNK: usize = 1 << 20;
/// Sectors asked about per `block_status` call while zeroing: a WRITE_ZEROES of up to
/// 4 GiB on a fragmented image must not build one huge extent list.
const ZERO_STATUS_WINDOW: u64 = 1 << 16;

/// Something a worker runs (besides the image calls): opening and closing images.
pub type Task = Box<dyn FnOnce() -> Result<Output, ImageError> + Send>;

/// An operation on an image. Sector numbers and counts are 512-byte sectors. Reads and
/// writes carry their own page-aligned buffer from the front door (grant copy or socket)
/// to the disk; a write's buffer comes back in [`Output::Data`] with unspecified contents
/// (an encrypted image encrypts it in place: [`Image::write_in_place`]).
pub enum Op {
    Read {
        sector: u64,
        buf: AlignedBuf,
    },
    Write {
        sector: u64,
        buf: AlignedBuf,
        fua: bool,
    },
    Flush,
    Discard {
        sector: u64,
        nsectors: u64,
        fua: bool,
    },
    /// Zero a range. Without `no_hole`, ranges the image reports unallocated (which read as
    /// zeros) are left alone, so zeroing keeps sparse images sparse.
    WriteZeroes {
        sector: u64,
        nsectors: u64,
        fua: bool,
        no_hole: bool,
    },
    BlockStatus {
        sector: u64,
        nsectors: u64,
    },
    /// Run a closure (open/close an image).
    Task(Task),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Read { sector, buf } => write!(f, "Read({sector}, {})", buf.len()),
            Op::Write { sector, buf, fua } => write!(f, "Write({sector}, {}, {fua})", buf.len()),
            Op::Flush => write!(f, "Flush"),
            Op::Discard {
                sector, nsectors, ..
            } => write!(f, "Discard({sector}, {nsectors})"),
            Op::WriteZeroes {
                sector, nsectors, ..
            } => write!(f, "WriteZeroes({sector}, {nsectors})"),
            Op::BlockStatus { sector, nsectors } => write!(f, "BlockStatus({sector}, {nsectors})"),
            Op::Task(_) => write!(f, "Task"),
        }
    }
}

/// What a successful job produced.
pub enum Output {
    /// Read data (the buffer handed in), or the buffer of a write given back.
    Data(AlignedBuf),
    Done,
    Extents(Vec<Extent>),
    Image(Arc<dyn Image>),
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Output::Data(d) => write!(f, "Data({})", d.len()),
            Output::Done => write!(f, "Done"),
            Output::Extents(e) => write!(f, "Extents({e:?})"),
            Output::Image(i) => write!(f, "Image({:?})", i.info()),
        }
    }
}

#[derive(Debug)]
struct Job<T> {
    image: Option<Arc<dyn Image>>,
    work: Work<T>,
}

/// What a worker does for a job.
#[derive(Debug)]
enum Work<T> {
    /// One operation, one completion.
    One { tag: T, op: Op },
    /// Commit a batch of writes the asynchronous engine moved ([`Image::commit_writes`]):
    /// one completion per write.
    Commit(Vec<Committing<T>>),
}

/// A write whose data the asynchronous engine moved to a mapping that needs a commit
/// ([`DirectMap::commit`]), waiting for it.
#[derive(Debug)]
struct Committing<T> {
    tag: T,
    buf: AlignedBuf,
    sector: u64,
}

/// One image's writes waiting for a commit, and whether a worker is committing a batch
/// of its writes now.
#[derive(Debug)]
struct CommitQueue<T> {
    image: Arc<dyn Image>,
    waiting: Vec<Committing<T>>,
    running: bool,
}

/// A finished job.
#[derive(Debug)]
pub struct Completion<T> {
    pub tag: T,
    pub result: Result<Output, ImageError>,
}

/// A read or write submitted with io_uring or Linux AIO from the loop.
#[derive(Debug)]
struct AioJob<T> {
    tag: T,
    /// The image (for the path in error messages) and where its bytes are.
    image: Arc<dyn Image>,
    map: DirectMap,
    /// First virtual sector (the first XTS tweak).
    sector: u64,
}

/// The workers' queue: first-in first-out per image, round-robin between images, so a VBD
/// that keeps many jobs queued (a guest flooding its ring) delays another VBD of the same
/// tapdisk by at most one job per busy image, not by its whole backlog. Jobs without an
/// image (tasks) form one more queue.
#[derive(Debug)]
struct FairQueue<J> {
    /// Per key, in service order: the front one is served next, then goes to the back.
    queues: VecDeque<(usize, VecDeque<J>)>,
}

impl<J> Default for FairQueue<J> {
    fn default() -> Self {
        FairQueue {
            queues: VecDeque::new(),
        }
    }
}

impl<J> FairQueue<J> {
    fn push(&mut self, key: usize, job: J) {
        match self.queues.iter_mut().find(|(k, _)| *k == key) {
            Some((_, q)) => q.push_back(job),
            None => self.queues.push_back((key, VecDeque::from([job]))),
        }
    }

    fn pop(&mut self) -> Option<J> {
        let (key, mut q) = self.queues.pop_front()?;
        let job = q.pop_front();
        if !q.is_empty() {
            self.queues.push_back((key, q));
        }
        job
    }
}

/// An image's identity while it is held (one per VBD).
fn image_key(image: &Arc<dyn Image>) -> usize {
    Arc::as_ptr(image).cast::<()>() as usize
}

impl<T> CommitQueue<T> {
    /// A worker's job committing every write waiting now.
    fn next_batch(&mut self) -> Job<T> {
        Job {
            image: Some(Arc::clone(&self.image)),
            work: Work::Commit(std::mem::take(&mut self.waiting)),
        }
    }
}

/// The fairness key of a job: its image, or 0 for a task.
fn fair_key<T>(job: &Job<T>) -> usize {
    job.image.as_ref().map_or(0, image_key)
}

#[derive(Debug)]
struct Shared<T> {
    jobs: Mutex<(FairQueue<Job<T>>, bool)>,
    cond: Condvar,
    done: Mutex<Vec<Completion<T>>>,
    waker: Waker,
    /// Per image with writes to commit (see [`Shared::start_commits`]).
    commits: Mutex<Vec<CommitQueue<T>>>,
}

impl<T> Shared<T> {
    fn push(&self, job: Job<T>) {
        let key = fair_key(&job);
        let mut q = lock(&self.jobs);
        q.0.push(key, job);
        drop(q);
        self.cond.notify_one();
    }

    /// Queue a write the asynchronous engine moved for its image's next commit batch.
    fn queue_commit(&self, image: &Arc<dyn Image>, write: Committing<T>) {
        let mut qs = lock(&self.commits);
        let key = image_key(image);
        match qs.iter_mut().find(|q| image_key(&q.image) == key) {
            Some(q) => q.waiting.push(write),
            None => qs.push(CommitQueue {
                image: Arc::clone(image),
                waiting: vec![write],
                running: false,
            }),
        }
    }

    /// Start a commit batch on a worker for every image that has writes waiting and no
    /// batch running. One batch per image at a time: the writes that complete while one
    /// runs (its `fdatasync`, its bitmap writes) form the next, so that under load one
    /// sync covers every write in flight, not the few one loop pass reaped.
    fn start_commits(&self) {
        let jobs: Vec<Job<T>> = lock(&self.commits)
            .iter_mut()
            .filter(|q| !q.running && !q.waiting.is_empty())
            .map(|q| {
                q.running = true;
                q.next_batch()
            })
            .collect();
        for j in jobs {
            self.push(j);
        }
    }

    /// A commit batch on `image` is done: the next one starts when writes arrived
    /// meanwhile, else the image is forgotten here.
    fn commit_done(&self, image: &Arc<dyn Image>) {
        let mut qs = lock(&self.commits);
        let key = image_key(image);
        let Some(i) = qs.iter().position(|q| image_key(&q.image) == key) else {
            return;
        };
        if qs[i].waiting.is_empty() {
            qs.swap_remove(i);
            return;
        }
        let job = qs[i].next_batch();
        drop(qs);
        self.push(job);
    }
}

/// The worker pool, plus the inline path for images that never wait for a device.
/// Dropping it stops the workers after the queued jobs.
#[derive(Debug)]
pub struct IoEngine<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    workers: Vec<JoinHandle<()>>,
    /// Run eligible jobs on the submitting thread (see [`IoEngine::submit`]).
    inline: bool,
    /// Completions of jobs run inline, handed out by the next [`IoEngine::completions`].
    inline_done: Mutex<Vec<Completion<T>>>,
    /// io_uring or Linux AIO from the submitting thread (None: neither could be set up,
    /// or switched off).
    aio: Option<Mutex<aio::Engine<AioJob<T>>>>,
    /// Reads and writes handed to the asynchronous engine (tests and logs), including
    /// those it then refused.
    aio_count: std::sync::atomic::AtomicU64,
    /// Submissions (first ones and short transfers' rests) the asynchronous engine
    /// refused for now and the workers took (see [`IoEngine::aio_refused`]).
    aio_refused: std::sync::atomic::AtomicU64,
}

impl<T: Send + 'static> IoEngine<T> {
    /// Start `threads` workers (at least one) and the default asynchronous engine
    /// ([`EngineChoice::Auto`]).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        Self::with_engine(threads, EngineChoice::Auto)
    }

    /// Start `threads` workers (at least one) and the first asynchronous engine of
    /// `choice` that sets up; one log line says which runs.
    pub fn with_engine(threads: usize, choice: EngineChoice) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            jobs: Mutex::new((FairQueue::default(), false)),
            cond: Condvar::new(),
            done: Mutex::new(Vec::new()),
            waker: Waker::new().map_err(std::io::Error::from)?,
            commits: Mutex::new(Vec::new()),
        });
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let s = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("td-io{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        let mut e = IoEngine {
            shared,
            workers,
            inline: true,
            inline_done: Mutex::new(Vec::new()),
            aio: None,
            aio_count: 0.into(),
            aio_refused: 0.into(),
        };
        let line = e.set_engine(choice);
        if line.contains("unavailable") {
            warn!("{line}");
        } else {
            info!("{line}");
        }
        Ok(e)
    }

    /// Replace the asynchronous engine (after the requests in flight on the old one
    /// completed: call it with none in flight) by the first of `choice` that sets up.
    /// Returns the line [`IoEngine::with_engine`] logs.
    fn set_engine(&mut self, choice: EngineChoice) -> String {
        self.set_engine_with(choice, &|kind, fd| aio::Engine::new(kind, AIO_DEPTH, fd))
    }

    fn set_engine_with(&mut self, choice: EngineChoice, setup: Setup<'_, AioJob<T>>) -> String {
        // The old engine first: its Drop waits for what it has in flight.
        self.aio = None;
        let (engine, line) = start_async(choice.order(), self.shared.waker.as_fd(), setup);
        self.aio = engine.map(Mutex::new);
        // A new engine logs its own refusals from the first one on.
        self.aio_refused
            .store(0, std::sync::atomic::Ordering::Relaxed);
        line
    }

    /// Whether reads and writes can go out from the loop (io_uring or Linux AIO).
    pub fn has_aio(&self) -> bool {
        self.aio.is_some()
    }

    /// The asynchronous interface in use, if any.
    pub fn engine(&self) -> Option<aio::Kind> {
        self.aio.as_ref().map(|a| lock(a).kind())
    }

    /// Reads and writes submitted with the asynchronous engine so far (including those it
    /// refused at submission and the workers then did).
    pub fn aio_count(&self) -> u64 {
        self.aio_count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Submissions the asynchronous engine refused for now (EAGAIN and the like:
    /// [`refused_for_now`]) whose transfers the workers did instead, since this engine
    /// started.
    pub fn aio_refused(&self) -> u64 {
        self.aio_refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Allow (the default) or forbid running jobs on the submitting thread.
    pub fn set_inline(&mut self, on: bool) {
        self.inline = on;
    }

    /// The eventfd that becomes readable when completions are waiting.
    pub fn waker(&self) -> &Waker {
        &self.shared.waker
    }

    /// Run an operation on `image`. Reads and writes up to [`INLINE_MAX`] bytes and flushes
    /// on a [memory-backed](Image::memory_backed) image run right here,
    /// on the caller's thread: they cannot wait for a device, and handing them to a worker
    /// would cost two thread switches, more than the copy itself. Reads and writes the
    /// image maps ([`Image::direct_map`]) go out with Linux AIO from here
    /// (`try_aio`). Everything else goes to the workers. Either way the result
    /// comes back through [`IoEngine::completions`] (check [`IoEngine::has_inline`] after
    /// submitting: inline results do not fire the waker).
    pub fn submit(&self, tag: T, image: Arc<dyn Image>, op: Op) {
        // Inline before AIO: on tmpfs it answers in the same loop pass, without the
        // eventfd round trip (measured: 5.2 against 6.4 us of CPU per 4 KiB read at QD1).
        if self.inline && runs_inline(image.as_ref(), &op) {
            let result = execute(Some(image.as_ref()), op);
            lock(&self.inline_done).push(Completion { tag, result });
            return;
        }
        let (tag, op) = match self.try_aio(tag, &image, op) {
            None => return,
            Some(back) => back,
        };
        self.push(Job {
            image: Some(image),
            work: Work::One { tag, op },
        });
    }

    /// The fast path: a read or a (non-FUA) write the image maps onto one run of a file
    /// that takes AIO ([`Image::direct_map`]) is submitted right here and completes through
    /// the eventfd; a write to an encrypted image is encrypted in place first. A submission
    /// the kernel refuses for now goes to the workers ([`IoEngine::fall_back`]), any other
    /// submission error is the request's. Gives the job back when it does not qualify.
    fn try_aio(&self, tag: T, image: &Arc<dyn Image>, op: Op) -> Option<(T, Op)> {
        let Some(aio) = &self.aio else {
            return Some((tag, op));
        };
        let (sector, len, write) = match &op {
            Op::Read { sector, buf } => (*sector, buf.len(), false),
            Op::Write {
                sector,
                buf,
                fua: false,
            } => (*sector, buf.len(), true),
            _ => return Some((tag, op)),
        };
        if len == 0 || !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Some((tag, op));
        }
        let mut ctx = lock(aio);
        if ctx.room() == 0 {
            return Some((tag, op));
        }
        let Some(map) = image.direct_map(sector, len as u64 / SECTOR_SIZE, write) else {
            return Some((tag, op));
        };
        let (dir, mut buf) = match op {
            Op::Read { buf, .. } => (aio::Dir::Read, buf),
            Op::Write { buf, .. } => (aio::Dir::Write, buf),
            other => return Some((tag, other)),
        };
        if write {
            if let Some(c) = &map.cipher {
                c.encrypt_sectors(sector, &mut buf);
            }
        }
        let req = aio::Request {
            dir,
            buf,
            start: 0,
            offset: map.offset,
            user: AioJob {
                tag,
                image: Arc::clone(image),
                map,
                sector,
            },
        };
        self.aio_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err((req, e)) = submit_aio(&mut ctx, req) {
            let kind = ctx.kind();
            drop(ctx);
            if refused_for_now(&e) {
                self.fall_back(kind, req, &e);
            } else {
                let r = Err(aio_error(&req.user.image, req.dir, e));
                lock(&self.inline_done).push(Completion {
                    tag: req.user.tag,
                    result: r,
                });
            }
        }
        None
    }

    /// Hand a request the asynchronous engine refused for now (at its first submission,
    /// or at the resubmission of a short transfer's rest) to the workers, and log it (the
    /// 1st, 10th, 100th, ... refusal of this engine, so that a kernel short of resources
    /// for a long time does not flood the log).
    ///
    /// The worker does what the kernel would have done: it moves the rest of the transfer,
    /// `buf[start..]`, at the mapped file offset ([`finish_direct`]), then completes the
    /// request as [`IoEngine::completions`] does for the engine's (a read is decrypted
    /// there). Not an [`Op::Read`] or [`Op::Write`] through the image: a write's buffer is
    /// already encrypted in place (the image would encrypt it again, so it would first
    /// have to be decrypted back), and after a short transfer part of it is already in the
    /// file (or in the buffer, for a read, still encrypted), which the image path would
    /// move again. The worker uses the mapping the engine would have used (the request
    /// holds the file open), so it is as valid as for a request in flight on the engine.
    fn fall_back(&self, kind: aio::Kind, req: aio::Request<AioJob<T>>, e: &std::io::Error) {
        let n = self
            .aio_refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if power_of_ten(n) {
            warn!(
                "{}: the kernel refused a submission ({e}); the worker threads did it \
                 instead ({n} so far, logged at 1, 10, 100, ...)",
                kind.name()
            );
        }
        let aio::Request {
            dir,
            buf,
            start,
            offset,
            user:
                AioJob {
                    tag,
                    image,
                    map,
                    sector,
                },
        } = req;
        let job_image = Arc::clone(&image);
        let task: Task =
            Box::new(move || finish_direct(&image, &map, sector, dir, buf, start, offset));
        self.push(Job {
            image: Some(job_image),
            work: Work::One {
                tag,
                op: Op::Task(task),
            },
        });
    }

    /// Finish what AIO completed: resubmit the rest of short transfers (to the workers
    /// when the kernel refuses it for now), decrypt reads, turn errors into the request's
    /// error.
    fn reap_aio(&self, out: &mut Vec<Completion<T>>) {
        let Some(aio) = &self.aio else {
            return;
        };
        let mut ctx = lock(aio);
        let mut done = Vec::new();
        if let Err(e) = ctx.reap(&mut done) {
            warn!("{}: reaping completions: {e}", ctx.kind().name());
        }
        for aio::Done { mut req, res } in done {
            let want = req.buf.len() - req.start;
            // Test builds: let injected faults replace the kernel's result.
            #[cfg(any(test, feature = "sim"))]
            let res =
                req.user
                    .map
                    .file
                    .inject_aio(req.dir == aio::Dir::Write, req.offset, want, res);
            let err = match usize::try_from(res) {
                Err(_) => Some(std::io::Error::from_raw_os_error(
                    res.checked_neg()
                        .and_then(|e| i32::try_from(e).ok())
                        .unwrap_or(libc::EIO),
                )),
                // No progress: the end of the file (reads) or no space (writes).
                Ok(0) => Some(std::io::Error::from_raw_os_error(match req.dir {
                    aio::Dir::Read => libc::EIO,
                    aio::Dir::Write => libc::ENOSPC,
                })),
                Ok(n) if n < want => {
                    // Short: submit the rest.
                    req.start += n;
                    req.offset += n as u64;
                    match submit_aio(&mut ctx, req) {
                        Ok(()) => continue,
                        Err((r, e)) if refused_for_now(&e) => {
                            // The workers move the rest (see fall_back).
                            self.fall_back(ctx.kind(), r, &e);
                            continue;
                        }
                        Err((r, e)) => {
                            req = r;
                            Some(e)
                        }
                    }
                }
                Ok(_) => None,
            };
            let aio::Request {
                dir, mut buf, user, ..
            } = req;
            let result = match err {
                Some(e) => Err(aio_error(&user.image, dir, e)),
                None if dir == aio::Dir::Write && user.map.commit => {
                    // In the file: acknowledged once committed, by a worker.
                    self.shared.queue_commit(
                        &user.image,
                        Committing {
                            tag: user.tag,
                            buf,
                            sector: user.sector,
                        },
                    );
                    continue;
                }
                None => {
                    transferred(&user.map, user.sector, dir, &mut buf);
                    Ok(Output::Data(buf))
                }
            };
            out.push(Completion {
                tag: user.tag,
                result,
            });
        }
        drop(ctx);
        self.shared.start_commits();
    }

    /// Queue a task (no image involved).
    pub fn run(&self, tag: T, task: Task) {
        self.push(Job {
            image: None,
            work: Work::One {
                tag,
                op: Op::Task(task),
            },
        });
    }

    fn push(&self, job: Job<T>) {
        self.shared.push(job);
    }

    /// Whether jobs run inline have completions waiting.
    pub fn has_inline(&self) -> bool {
        !lock(&self.inline_done).is_empty()
    }

    /// Take the completions: those of inline jobs, then AIO's and the workers' (resets the
    /// waker first; AIO completions signal the same eventfd).
    pub fn completions(&self) -> Vec<Completion<T>> {
        let mut out = std::mem::take(&mut *lock(&self.inline_done));
        self.shared.waker.reset();
        self.reap_aio(&mut out);
        out.append(&mut lock(&self.shared.done));
        out
    }
}

impl<T: Send + 'static> Drop for IoEngine<T> {
    fn drop(&mut self) {
        // The AIO context first: its io_destroy waits for the requests in flight, which
        // signal the waker's eventfd (dropped with `shared`).
        self.aio = None;
        lock(&self.shared.jobs).1 = true;
        self.shared.cond.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Lock, ignoring poisoning (a panicking worker must not take the daemon down with it).
fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker<T: Send>(s: &Shared<T>) {
    loop {
        let job = {
            let mut q = lock(&s.jobs);
            loop {
                if let Some(j) = q.0.pop() {
                    break j;
                }
                if q.1 {
                    return;
                }
                q = s.cond.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let mut out = match job.work {
            Work::One { tag, op } => vec![Completion {
                tag,
                result: execute(job.image.as_deref(), op),
            }],
            Work::Commit(writes) => commit(s, job.image, writes),
        };
        let mut done = lock(&s.done);
        let was_empty = done.is_empty();
        done.append(&mut out);
        drop(done);
        // The loop resets the eventfd before taking the list, so waking only on the
        // empty -> non-empty transition never loses a completion.
        if was_empty {
            s.waker.wake();
        }
    }
}

/// On a worker: commit a batch of writes the asynchronous engine moved to one image
/// ([`Image::commit_writes`]), then start the image's next batch if writes arrived
/// meanwhile. One completion per write: its buffer back, or its error.
fn commit<T>(
    s: &Shared<T>,
    image: Option<Arc<dyn Image>>,
    writes: Vec<Committing<T>>,
) -> Vec<Completion<T>> {
    let Some(image) = image else {
        return writes
            .into_iter()
            .map(|w| Completion {
                tag: w.tag,
                result: Err(no_image()),
            })
            .collect();
    };
    // The image's next batch starts when this one ends, also should commit_writes panic
    // (a panicking BlockFile): else its later writes would wait for ever.
    let _next = BatchDone { s, image: &image };
    let ranges: Vec<(u64, u64)> = writes
        .iter()
        .map(|w| (w.sector, w.buf.len() as u64 / SECTOR_SIZE))
        .collect();
    let mut results = image.commit_writes(&ranges).into_iter();
    writes
        .into_iter()
        .map(|w| Completion {
            tag: w.tag,
            result: results
                .next()
                .unwrap_or_else(|| Err(ImageError::Invalid("no commit result".into())))
                .map(|()| Output::Data(w.buf)),
        })
        .collect()
}

/// Ends a commit batch on drop ([`Shared::commit_done`]).
struct BatchDone<'a, T> {
    s: &'a Shared<T>,
    image: &'a Arc<dyn Image>,
}

impl<T> Drop for BatchDone<'_, T> {
    fn drop(&mut self) {
        self.s.commit_done(self.image);
    }
}

/// Submit `req` on the descriptor of its mapped file.
#[allow(clippy::result_large_err)]
fn submit_aio<T>(
    ctx: &mut aio::Engine<AioJob<T>>,
    req: aio::Request<AioJob<T>>,
) -> Result<(), (aio::Request<AioJob<T>>, std::io::Error)> {
    // Test builds: let injected faults refuse the submission as the kernel would.
    #[cfg(any(test, feature = "sim"))]
    if let Some(e) = req.user.map.file.inject_aio_submit(
        req.dir == aio::Dir::Write,
        req.offset,
        req.buf.len().saturating_sub(req.start),
    ) {
        return Err((req, e));
    }
    let file = Arc::clone(&req.user.map.file);
    match file.aio_fd() {
        Some(fd) => ctx.submit(fd, req),
        None => Err((req, std::io::Error::from_raw_os_error(libc::EBADF))),
    }
}

/// Whether `n` is 1, 10, 100, ...
fn power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// Whether a submission error means the kernel could not take the request now, though
/// it (or a worker) could do it later: EAGAIN (`io_submit`: not enough resources to queue
/// it; `io_uring_enter`: no memory or other resources for it, or the engine's own "no
/// free slot"), ENOMEM, EBUSY (`io_uring_enter`: completions must be reaped first) and
/// EINTR. Such a request goes to the workers ([`IoEngine::fall_back`]). Every other
/// error is the request's own: EBADF (the descriptor cannot do this, e.g. a write on a
/// read-only file), EINVAL (misaligned or out-of-range for the interface), EFAULT and the
/// like describe the request or the file, and a worker would meet the same or hide a bug;
/// an interface refused for good (ENOSYS, EPERM) is a matter for the engine's setup,
/// which already falls back to the workers for everything when it fails.
fn refused_for_now(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::ENOMEM | libc::EBUSY | libc::EINTR)
    )
}

/// Complete a mapped read or write that moved all its bytes: a read of an encrypted
/// image is decrypted in place (the first virtual sector is the first tweak).
fn transferred(map: &DirectMap, sector: u64, dir: aio::Dir, buf: &mut AlignedBuf) {
    if dir == aio::Dir::Read {
        if let Some(c) = &map.cipher {
            c.decrypt_sectors(sector, buf);
        }
    }
}

/// On a worker: the rest of a mapped read or write the asynchronous engine refused,
/// `buf[start..]` at `offset` of the mapped file (the first `start` bytes were moved by
/// the engine already, in a short transfer), with blocking positional I/O; then the same
/// completion as the engine's ([`transferred`]). A write's buffer holds what goes to the
/// file (already encrypted); a read that reaches the end of the file fails with EIO, as
/// on the engine.
fn finish_direct(
    image: &Arc<dyn Image>,
    map: &DirectMap,
    sector: u64,
    dir: aio::Dir,
    mut buf: AlignedBuf,
    start: usize,
    offset: u64,
) -> Result<Output, ImageError> {
    let r = match (dir, buf.get_mut(start..)) {
        (aio::Dir::Read, Some(rest)) => map.file.read_at(rest, offset),
        (aio::Dir::Write, Some(rest)) => map.file.write_at(rest, offset),
        (_, None) => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
    };
    r.map_err(|e| aio_error(image, dir, e))?;
    if dir == aio::Dir::Write && map.commit {
        for r in image.commit_writes(&[(sector, buf.len() as u64 / SECTOR_SIZE)]) {
            r?;
        }
    }
    transferred(map, sector, dir, &mut buf);
    Ok(Output::Data(buf))
}

/// The error of a failed AIO request, named after its image.
fn aio_error(image: &Arc<dyn Image>, dir: aio::Dir, e: std::io::Error) -> ImageError {
    let path = image
        .layers()
        .first()
        .map(|l| l.path.display().to_string())
        .unwrap_or_default();
    let op = match dir {
        aio::Dir::Read => "read",
        aio::Dir::Write => "write",
    };
    ImageError::io(path, op, e)
}

/// Whether `op` on `image` may run on the submitting thread.
fn runs_inline(image: &dyn Image, op: &Op) -> bool {
    let small = match op {
        Op::Read { buf, .. } | Op::Write { buf, .. } => buf.len() <= INLINE_MAX,
        Op::Flush => true,
        // Allocation queries can walk a whole file (SEEK_HOLE on tmpfs), discards and
        // zeroing can span the whole disk: workers.
        Op::BlockStatus { .. } | Op::Discard { .. } | Op::WriteZeroes { .. } | Op::Task(_) => false,
    };
    small && image.memory_backed()
}

fn no_image() -> ImageError {
    ImageError::Invalid("no image for request".into())
}

fn execute(image: Option<&dyn Image>, op: Op) -> Result<Output, ImageError> {
    if let Op::Task(t) = op {
        return t();
    }
    let img = image.ok_or_else(no_image)?;
    match op {
        Op::Read { sector, mut buf } => {
            img.read(sector, &mut buf)?;
            Ok(Output::Data(buf))
        }
        Op::Write {
            sector,
            mut buf,
            fua,
        } => {
            img.write_in_place(sector, &mut buf)?;
            if fua {
                img.flush()?;
            }
            Ok(Output::Data(buf))
        }
        Op::Flush => img.flush().map(|_| Output::Done),
        Op::Discard {
            sector,
            nsectors,
            fua,
        } => {
            img.discard(sector, nsectors)?;
            if fua {
                img.flush()?;
            }
            Ok(Output::Done)
        }
        Op::WriteZeroes {
            sector,
            nsectors,
            fua,
            no_hole,
        } => {
            let zero = AlignedBuf::zeroed(ZERO_CHUNK);
            let per = ZERO_CHUNK as u64 / SECTOR_SIZE;
            // Check the whole range first: nothing is zeroed when it is out of range.
            crate::image::check_sectors(sector, nsectors, img.info().size_sectors)?;
            let last = sector + nsectors;
            let mut window = sector;
            while window < last {
                let wn = (last - window).min(ZERO_STATUS_WINDOW);
                let ranges = if no_hole {
                    vec![(window, wn)]
                } else {
                    img.block_status(window, wn)?
                        .into_iter()
                        .filter(|e| e.allocated)
                        .map(|e| (e.sector, e.nsectors))
                        .collect()
                };
                for (start, count) in ranges {
                    let end = start.saturating_add(count);
                    let mut s = start;
                    while s < end {
                        let n = (end - s).min(per);
                        // n <= per, so the slice bound fits usize.
                        img.write(s, &zero[..(n * SECTOR_SIZE) as usize])?;
                        s += n;
                    }
                }
                window += wn;
            }
            if fua {
                img.flush()?;
            }
            Ok(Output::Done)
        }
        Op::BlockStatus { sector, nsectors } => {
            img.block_status(sector, nsectors).map(Output::Extents)
        }
        Op::Task(_) => Err(no_image()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::DirectMap;
    use crate::tapdisk::mem::MemImage;
    use std::time::{Duration, Instant};

    fn wait_all<T: Send + 'static>(e: &IoEngine<T>, n: usize) -> Vec<Completion<T>> {
        let mut got = Vec::new();
        let start = Instant::now();
        while got.len() < n {
            assert!(start.elapsed() < Duration::from_secs(10));
            got.extend(e.completions());
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    #[test]
    fn jobs_complete_with_their_tags_and_data() {
        let img: Arc<dyn Image> = Arc::new(MemImage::new(64, false));
        let e = IoEngine::new(3).unwrap();
        e.submit(
            1u32,
            img.clone(),
            Op::Write {
                sector: 2,
                buf: AlignedBuf::from_slice(&[7u8; 1024]),
                fua: true,
            },
        );
        let c = wait_all(&e, 1);
        assert_eq!(c[0].tag, 1);
        for i in 0..20u32 {
            e.submit(
                100 + i,
                img.clone(),
                Op::Read {
                    sector: 2,
                    buf: AlignedBuf::zeroed(1024),
                },
            );
        }
        e.submit(
            5,
            img.clone(),
            Op::WriteZeroes {
                sector: 60,
                nsectors: 10,
                fua: false,
                no_hole: true,
            },
        );
        let c = wait_all(&e, 21);
        let mut tags: Vec<u32> = c.iter().map(|c| c.tag).collect();
        tags.sort();
        assert_eq!(tags[0], 5);
        for c in &c {
            match (&c.tag, &c.result) {
                (5, Err(e)) => assert_eq!(e.errno(), libc::EINVAL),
                (_, Ok(Output::Data(d))) => assert!(d.iter().all(|b| *b == 7)),
                r => panic!("{r:?}"),
            }
        }
    }

    #[test]
    fn tasks_run_and_waker_fires() {
        let e = IoEngine::new(1).unwrap();
        let mut r = super::super::reactor::Reactor::new().unwrap();
        r.add(
            e.waker(),
            super::super::reactor::Token::IoDone,
            Default::default(),
        )
        .unwrap();
        r.modify(
            e.waker(),
            super::super::reactor::Token::IoDone,
            super::super::reactor::Interest::READ,
        )
        .unwrap();
        e.run("t", Box::new(|| Ok(Output::Done)));
        let mut out = Vec::new();
        r.wait(Some(Duration::from_secs(5)), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        let c = e.completions();
        assert!(matches!(c[0].result, Ok(Output::Done)));
    }

    #[test]
    fn write_zeroes_keeps_holes_unless_no_hole() {
        let img = MemImage::new(64, false);
        img.write(0, &[9u8; 1024]).unwrap();
        let zero = |no_hole| Op::WriteZeroes {
            sector: 0,
            nsectors: 8,
            fua: false,
            no_hole,
        };
        execute(Some(&img), zero(false)).unwrap();
        let ext = img.block_status(0, 8).unwrap();
        assert_eq!((ext[0].nsectors, ext[0].allocated), (2, true));
        assert!(!ext[1].allocated);
        let mut b = vec![1u8; 4096];
        img.read(0, &mut b).unwrap();
        assert!(b.iter().all(|x| *x == 0));
        execute(Some(&img), zero(true)).unwrap();
        assert_eq!(img.block_status(0, 8).unwrap().len(), 1);
        assert!(img.block_status(0, 8).unwrap()[0].allocated);
    }

    /// A MemImage that says it is memory-backed (when `memory`) and records the thread of
    /// every read, write and discard.
    #[derive(Debug)]
    struct Spy {
        img: MemImage,
        memory: bool,
        threads: Mutex<Vec<std::thread::ThreadId>>,
    }

    impl Spy {
        fn new(memory: bool) -> Arc<Spy> {
            Arc::new(Spy {
                img: MemImage::new(4096, false),
                memory,
                threads: Mutex::new(Vec::new()),
            })
        }
        fn note(&self) {
            self.threads
                .lock()
                .unwrap()
                .push(std::thread::current().id());
        }
        /// The thread of the last call, and whether it was the caller's.
        fn last_was_here(&self) -> bool {
            *self.threads.lock().unwrap().last().unwrap() == std::thread::current().id()
        }
    }

    impl Image for Spy {
        fn info(&self) -> crate::image::ImageInfo {
            self.img.info()
        }
        fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
            self.note();
            self.img.read(sector, buf)
        }
        fn write(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError> {
            self.note();
            self.img.write(sector, buf)
        }
        fn flush(&self) -> Result<(), ImageError> {
            self.img.flush()
        }
        fn discard(&self, sector: u64, n: u64) -> Result<(), ImageError> {
            self.note();
            self.img.discard(sector, n)
        }
        fn block_status(&self, sector: u64, n: u64) -> Result<Vec<Extent>, ImageError> {
            self.img.block_status(sector, n)
        }
        fn close(&self) -> Result<(), ImageError> {
            self.img.close()
        }
        fn memory_backed(&self) -> bool {
            self.memory
        }
    }

    fn read(len: usize) -> Op {
        Op::Read {
            sector: 0,
            buf: AlignedBuf::zeroed(len),
        }
    }

    #[test]
    fn memory_backed_reads_and_writes_run_inline_without_waking() {
        let spy = Spy::new(true);
        let e = IoEngine::new(2).unwrap();
        let write = Op::Write {
            sector: 8,
            buf: AlignedBuf::from_slice(&[5u8; 4096]),
            fua: true,
        };
        e.submit(1u32, spy.clone(), write);
        assert!(spy.last_was_here());
        assert!(e.has_inline());
        e.submit(2u32, spy.clone(), read(INLINE_MAX));
        assert!(spy.last_was_here());
        // Inline results do not touch the eventfd: the loop finds them through has_inline.
        let mut r = super::super::reactor::Reactor::new().unwrap();
        let t = super::super::reactor::Token::IoDone;
        r.add(e.waker(), t, super::super::reactor::Interest::READ)
            .unwrap();
        let mut out = Vec::new();
        r.wait(Some(Duration::ZERO), &mut out).unwrap();
        assert!(out.is_empty());
        let c = e.completions();
        assert_eq!(c.iter().map(|c| c.tag).collect::<Vec<_>>(), vec![1, 2]);
        assert!(matches!(&c[0].result, Ok(Output::Data(d)) if d.len() == 4096));
        assert!(!e.has_inline());
        let mut b = vec![0u8; 4096];
        spy.img.read(8, &mut b).unwrap();
        assert_eq!(b, vec![5u8; 4096]);
    }

    #[test]
    fn big_transfers_discards_and_other_images_go_to_the_workers() {
        let cases: Vec<(bool, bool, Op)> = vec![
            (true, true, read(INLINE_MAX + 512)),
            (
                true,
                true,
                Op::Discard {
                    sector: 0,
                    nsectors: 8,
                    fua: false,
                },
            ),
            (false, true, read(4096)),
            (true, false, read(4096)),
        ];
        for (i, (memory, inline, op)) in cases.into_iter().enumerate() {
            let spy = Spy::new(memory);
            let mut e = IoEngine::new(1).unwrap();
            e.set_inline(inline);
            e.submit(i, spy.clone(), op);
            assert!(!e.has_inline(), "case {i}");
            let c = wait_all(&e, 1);
            assert!(c[0].result.is_ok(), "case {i}");
            assert!(!spy.last_was_here(), "case {i}");
        }
    }

    /// The `Image` methods a test wrapper passes on to the image in its field 0 as they
    /// are (all the required ones but `block_status`).
    macro_rules! pass_on_image {
        () => {
            fn info(&self) -> crate::image::ImageInfo {
                self.0.info()
            }
            fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
                self.0.read(sector, buf)
            }
            fn write(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError> {
                self.0.write(sector, buf)
            }
            fn flush(&self) -> Result<(), ImageError> {
                self.0.flush()
            }
            fn discard(&self, sector: u64, n: u64) -> Result<(), ImageError> {
                self.0.discard(sector, n)
            }
            fn close(&self) -> Result<(), ImageError> {
                self.0.close()
            }
        };
    }

    /// Records the largest range `block_status` was asked about.
    #[derive(Debug)]
    struct Widest(MemImage, std::sync::atomic::AtomicU64);

    impl Image for Widest {
        pass_on_image!();
        fn block_status(&self, sector: u64, n: u64) -> Result<Vec<Extent>, ImageError> {
            self.1.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
            self.0.block_status(sector, n)
        }
    }

    #[test]
    fn write_zeroes_asks_for_allocation_in_bounded_windows() {
        let sectors = 3 * ZERO_STATUS_WINDOW + 5;
        let img = Widest(MemImage::new(sectors, false), 0.into());
        // Data in every window, including the short last one.
        for w in 0..4 {
            img.write(w * ZERO_STATUS_WINDOW + 1, &[7u8; 1024]).unwrap();
        }
        let op = Op::WriteZeroes {
            sector: 0,
            nsectors: sectors,
            fua: false,
            no_hole: false,
        };
        execute(Some(&img), op).unwrap();
        assert_eq!(
            img.1.load(std::sync::atomic::Ordering::Relaxed),
            ZERO_STATUS_WINDOW
        );
        let mut b = vec![1u8; 1536];
        for w in 0..4 {
            img.read(w * ZERO_STATUS_WINDOW, &mut b).unwrap();
            assert!(b.iter().all(|x| *x == 0), "window {w}");
        }
    }

    // ---- the AIO fast path, on real files (ext4 under /var/tmp) ----

    use crate::image::chain::{open_vhd_chain, OpenOptions as ChainOptions};
    use crate::image::raw::RawImage;

    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp").unwrap()
    }

    /// The asynchronous engines to test: io_uring where this kernel sets it up (a note
    /// otherwise), and Linux AIO.
    fn async_engines() -> Vec<EngineChoice> {
        let mut v = Vec::new();
        let e = IoEngine::<u8>::with_engine(1, EngineChoice::Uring).unwrap();
        if e.engine() == Some(aio::Kind::Uring) {
            v.push(EngineChoice::Uring);
        } else {
            eprintln!("io_uring unavailable here: testing Linux AIO only");
        }
        v.push(EngineChoice::Aio);
        v
    }

    /// The interface `choice` runs on when it sets up.
    fn kind_of(choice: EngineChoice) -> Option<aio::Kind> {
        choice.order().first().copied()
    }

    fn pat(n: usize, seed: u64) -> AlignedBuf {
        let v: Vec<u8> = (0..n as u64)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8)
            .collect();
        AlignedBuf::from_slice(&v)
    }

    /// Random sector-sized writes then reads of a raw O_DIRECT image, through io_uring,
    /// through AIO and through the workers: the same answers, the same file.
    #[test]
    fn async_and_worker_paths_agree_on_a_raw_direct_image() {
        let mut files = Vec::new();
        let d = disk_dir();
        let mut choices = async_engines();
        choices.push(EngineChoice::Threads);
        for choice in choices {
            let use_aio = choice != EngineChoice::Threads;
            let p = d.path().join(format!("r{choice:?}.raw"));
            std::fs::write(&p, vec![0u8; 4 << 20]).unwrap();
            let img: Arc<dyn Image> = Arc::new(RawImage::open_with(&p, false, true).unwrap());
            let e = IoEngine::with_engine(2, choice).unwrap();
            assert_eq!(e.engine(), kind_of(choice));
            let mut model = vec![0u8; 4 << 20];
            let mut seed = 7u64;
            let mut next = |m: u64| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) % m
            };
            let mut ops = Vec::new();
            for i in 0..64u64 {
                let n = (1 + next(64)) as usize * 512;
                let sector = next(8192 - n as u64 / 512);
                let data = pat(n, i);
                let off = sector as usize * 512;
                model[off..off + n].copy_from_slice(&data);
                ops.push((sector, n));
                e.submit(
                    i,
                    img.clone(),
                    Op::Write {
                        sector,
                        buf: data,
                        fua: false,
                    },
                );
                // One at a time: overlapping writes in flight together have no order.
                let c = wait_all(&e, 1);
                assert!(c[0].result.is_ok(), "{:?}", c[0].result);
            }
            for (i, (sector, n)) in ops.iter().enumerate() {
                e.submit(
                    1000 + i as u64,
                    img.clone(),
                    Op::Read {
                        sector: *sector,
                        buf: AlignedBuf::zeroed(*n),
                    },
                );
            }
            let c = wait_all(&e, ops.len());
            for c in c {
                let (sector, n) = ops[(c.tag - 1000) as usize];
                let Ok(Output::Data(b)) = c.result else {
                    panic!("{:?}", c.result)
                };
                let off = sector as usize * 512;
                assert_eq!(b[..], model[off..off + n], "read {sector}+{n}");
            }
            assert_eq!(e.aio_count() > 0, use_aio, "{choice:?}: {}", e.aio_count());
            img.flush().unwrap();
            files.push(std::fs::read(&p).unwrap());
            assert_eq!(files.last().unwrap(), &model, "{choice:?}");
        }
        assert!(files.windows(2).all(|w| w[0] == w[1]));
    }

    /// An image whose direct map points wherever the test says: errors of the kernel reach
    /// the request they belong to.
    #[derive(Debug)]
    struct Mapped {
        img: MemImage,
        file: Arc<dyn crate::image::file::BlockFile>,
        /// sector -> file offset
        at: std::collections::HashMap<u64, u64>,
    }

    impl Image for Mapped {
        fn info(&self) -> crate::image::ImageInfo {
            self.img.info()
        }
        fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
            self.img.read(sector, buf)
        }
        fn write(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError> {
            self.img.write(sector, buf)
        }
        fn flush(&self) -> Result<(), ImageError> {
            Ok(())
        }
        fn discard(&self, s: u64, n: u64) -> Result<(), ImageError> {
            self.img.discard(s, n)
        }
        fn block_status(&self, s: u64, n: u64) -> Result<Vec<Extent>, ImageError> {
            self.img.block_status(s, n)
        }
        fn close(&self) -> Result<(), ImageError> {
            Ok(())
        }
        fn direct_map(&self, sector: u64, _n: u64, _write: bool) -> Option<DirectMap> {
            Some(DirectMap {
                file: self.file.clone(),
                offset: *self.at.get(&sector)?,
                cipher: None,
                commit: false,
            })
        }
    }

    #[test]
    fn aio_errors_and_short_transfers_reach_the_right_request() {
        for choice in async_engines() {
            errors_and_short_transfers(choice);
        }
    }

    fn errors_and_short_transfers(choice: EngineChoice) {
        use crate::image::file::{BlockFile, OsFile, SysOpener};
        let d = disk_dir();
        let p = d.path().join("f");
        std::fs::write(&p, pat(16384, 3).to_vec()).unwrap();
        // Read-only and direct: writes fail with EBADF at submission.
        let file = Arc::new(OsFile::open_with(&p, false, true, &SysOpener).unwrap());
        assert!(file.aio_fd().is_some());
        let at = [(0u64, 0u64), (1, 4096), (2, 12288), (3, 16384), (4, 8192)].into();
        let img: Arc<dyn Image> = Arc::new(Mapped {
            img: MemImage::new(64, false),
            file,
            at,
        });
        let e = IoEngine::with_engine(1, choice).unwrap();
        assert_eq!(e.engine(), kind_of(choice));
        let read = |sector, n| Op::Read {
            sector,
            buf: AlignedBuf::zeroed(n),
        };
        e.submit(0u32, img.clone(), read(0, 4096)); // fine
        e.submit(1, img.clone(), read(1, 4096)); // fine
        e.submit(2, img.clone(), read(2, 8192)); // short: 4096 then end of file -> EIO
        e.submit(3, img.clone(), read(3, 512)); // at the end: no progress -> EIO
        e.submit(
            4,
            img.clone(),
            Op::Write {
                sector: 4,
                buf: pat(512, 1),
                fua: false,
            },
        ); // EBADF
        e.submit(5, img.clone(), read(63, 512)); // not mapped: the workers, fine
        let mut c = wait_all(&e, 6);
        c.sort_by_key(|c| c.tag);
        let whole = pat(16384, 3);
        for c in &c {
            match (c.tag, &c.result) {
                (0, Ok(Output::Data(b))) => assert_eq!(b[..], whole[..4096]),
                (1, Ok(Output::Data(b))) => assert_eq!(b[..], whole[4096..8192]),
                (2 | 3, Err(e)) => assert_eq!(e.errno(), libc::EIO, "{choice:?} {e}"),
                (4, Err(e)) => assert_eq!(e.errno(), libc::EBADF, "{choice:?} {e}"),
                (5, Ok(Output::Data(b))) => assert!(b.iter().all(|&x| x == 0)),
                r => panic!("{choice:?} {r:?}"),
            }
        }
        assert_eq!(e.aio_count(), 5);
    }

    /// A dynamic VHD (encrypted) whose blocks are being allocated by the workers while
    /// fast-path writes and reads run on an allocated block: everything lands.
    #[test]
    fn vhd_allocation_on_the_workers_while_aio_runs_on_allocated_blocks() {
        for choice in async_engines() {
            vhd_allocation_while_async(choice);
        }
    }

    fn vhd_allocation_while_async(choice: EngineChoice) {
        use crate::image::crypto::KeySource;
        let d = disk_dir();
        let p = d.path().join("v.vhd");
        crate::image::vhd::ops::create(
            &p,
            &crate::image::vhd::ops::CreateOptions::dynamic(32 << 20),
        )
        .unwrap();
        let key = [0x5cu8; 64];
        {
            let meta = crate::image::vhd::VhdImage::open(
                &p,
                &crate::image::vhd::VhdOpenOptions {
                    read_only: false,
                    ..Default::default()
                },
            )
            .unwrap();
            meta.set_keyhash(&crate::image::crypto::KeyHash::for_key(&key, &[7u8; 32]))
                .unwrap();
            meta.close().unwrap();
        }
        let keys = || KeySource::Explicit(key.to_vec().into());
        let opts = ChainOptions {
            read_only: false,
            direct: true,
            keys: keys(),
            ..Default::default()
        };
        let img: Arc<dyn Image> = Arc::new(open_vhd_chain(&p, &opts).unwrap());
        let e = IoEngine::with_engine(3, choice).unwrap();
        assert_eq!(e.engine(), kind_of(choice));
        // Block 0 fully written first (worker path: allocation), caching its bitmap.
        e.submit(
            0u64,
            img.clone(),
            Op::Write {
                sector: 0,
                buf: pat(2 << 20, 0),
                fua: false,
            },
        );
        assert!(wait_all(&e, 1)[0].result.is_ok());
        let before = e.aio_count();
        let mut model: std::collections::HashMap<u64, AlignedBuf> = Default::default();
        let mut tag = 1u64;
        // Submit an 8 KiB write of pattern `tag` at sector `s` and record it in the model.
        let mut write = |s: u64| {
            e.submit(
                tag,
                img.clone(),
                Op::Write {
                    sector: s,
                    buf: pat(8192, tag),
                    fua: false,
                },
            );
            model.insert(s, pat(8192, tag));
            tag += 1;
        };
        for round in 0..8u64 {
            // Fast-path writes to block 0 go in first (the metadata lock is free, so
            // direct_map answers) and are in flight on AIO ...
            for k in 0..4u64 {
                write(round * 64 + k * 16);
            }
            // ... while an allocating write to block 1 + round runs on the workers.
            write((1 + round) * 4096 + round * 8);
            let c = wait_all(&e, 5);
            assert!(c.iter().all(|c| c.result.is_ok()));
        }
        assert!(e.aio_count() >= before + 32, "{} {before}", e.aio_count());
        for (s, want) in &model {
            e.submit(
                *s,
                img.clone(),
                Op::Read {
                    sector: *s,
                    buf: AlignedBuf::zeroed(8192),
                },
            );
            let c = wait_all(&e, 1);
            let Ok(Output::Data(b)) = &c[0].result else {
                panic!("{:?}", c[0].result)
            };
            assert_eq!(b, want, "sector {s}");
        }
        img.close().unwrap();
        // The file holds ciphertext the buffered, worker-only tools read back right.
        let plain = open_vhd_chain(
            &p,
            &ChainOptions {
                keys: keys(),
                ..Default::default()
            },
        )
        .unwrap();
        for (s, want) in &model {
            let mut b = vec![0u8; 8192];
            plain.read(*s, &mut b).unwrap();
            assert_eq!(b[..], want[..], "sector {s} after reopen");
        }
        assert_eq!(plain.allocated_blocks(), 9);
    }

    /// ENOSPC for real: a sparse raw image larger than the small ext4 it lives on (mounted
    /// from a loop device; needs root, skipped with a note without). AIO writes past the
    /// free space fail with ENOSPC on their own request; the others land.
    #[test]
    fn aio_enospc_reaches_the_requests_that_hit_it() {
        use std::process::{Command, Stdio};
        /// Unmounted before the backing file goes.
        struct Mount {
            dir: tempfile::TempDir,
            _backing: tempfile::NamedTempFile,
        }
        impl Drop for Mount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg(self.dir.path()).status();
            }
        }
        let backing = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        backing.as_file().set_len(8 << 20).unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let quiet = |c: &mut Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let ok = quiet(
            Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(backing.path()),
        ) && quiet(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(backing.path())
                .arg(mnt.path()),
        );
        if !ok {
            eprintln!("cannot mount a loop ext4 here (not root?): ENOSPC test skipped");
            return;
        }
        let m = Mount {
            dir: mnt,
            _backing: backing,
        };
        for choice in async_engines() {
            enospc_on(&m.dir.path().join(format!("{choice:?}.raw")), choice);
        }
    }

    fn enospc_on(p: &std::path::Path, choice: EngineChoice) {
        let p = p.to_path_buf();
        std::fs::File::create(&p)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let img: Arc<dyn Image> = Arc::new(RawImage::open_with(&p, false, true).unwrap());
        let e = IoEngine::with_engine(1, choice).unwrap();
        assert_eq!(e.engine(), kind_of(choice));
        let n = 24u64;
        for i in 0..n {
            let op = Op::Write {
                sector: i * 2048,
                buf: pat(1 << 20, i),
                fua: false,
            };
            e.submit(i, img.clone(), op);
        }
        let c = wait_all(&e, n as usize);
        assert_eq!(e.aio_count(), n);
        let mut landed = Vec::new();
        let mut full = 0;
        for c in c {
            match c.result {
                Ok(_) => landed.push(c.tag),
                Err(err) => {
                    assert_eq!(err.errno(), libc::ENOSPC, "{choice:?} {err}");
                    full += 1;
                }
            }
        }
        assert!(
            full > 0 && !landed.is_empty(),
            "{choice:?}: {full} full, {landed:?}"
        );
        for i in landed {
            e.submit(
                i,
                img.clone(),
                Op::Read {
                    sector: i * 2048,
                    buf: AlignedBuf::zeroed(1 << 20),
                },
            );
            let c = wait_all(&e, 1);
            let Ok(Output::Data(b)) = &c[0].result else {
                panic!("{:?}", c[0].result)
            };
            assert!(*b == pat(1 << 20, i), "write {i} landed");
        }
        drop(img);
        // Give the space back to the next engine's file (freed blocks are reusable once
        // the journal has committed).
        std::fs::remove_file(&p).unwrap();
        assert!(std::process::Command::new("sync")
            .status()
            .unwrap()
            .success());
    }

    // ---- submissions the kernel refuses (EAGAIN ...): the workers finish them ----

    use crate::image::fault::{Access, Fault, FaultFile, Injector, Point};
    use crate::image::file::BlockFile;

    /// An image under test for the fast path's edge cases: O_DIRECT on ext4, its file
    /// behind a [`FaultFile`], whose injector records the positional reads and writes and
    /// the fdatasyncs (`calls`).
    struct Refusing {
        img: Arc<dyn Image>,
        inj: Arc<Injector>,
        /// The positional reads and writes and the fdatasyncs that reached the file (not
        /// the asynchronous reads and writes).
        calls: Arc<Mutex<Vec<Access>>>,
        /// The image's file, below the injector (reads of it are not recorded).
        below: Arc<dyn BlockFile>,
        /// Sectors the fast path maps (within one allocated VHD block).
        base: u64,
        _dir: tempfile::TempDir,
    }

    impl Refusing {
        /// A raw image, or (`encrypted`) a dynamic VHD with a key whose first block is
        /// allocated and written, so that its ranges map to the file.
        fn open(encrypted: bool) -> Refusing {
            let mut r = Refusing::wrapped(encrypted, encrypted);
            if encrypted {
                // Block 0 written whole: allocated, every bit set, its bitmap cached.
                r.img.write(0, &pat(2 << 20, 78)).unwrap();
            }
            r.base = 64;
            assert!(r
                .img
                .direct_map(r.base, 64, true)
                .is_some_and(|m| !m.commit));
            assert_eq!(
                r.img.direct_map(r.base, 1, false).unwrap().cipher.is_some(),
                encrypted
            );
            lock(&r.calls).clear();
            r
        }

        /// A new 32 MiB dynamic VHD (`vhd`; with a key when `encrypted`) or a 4 MiB raw
        /// image, opened below an injector whose watcher records every call.
        fn wrapped(vhd: bool, encrypted: bool) -> Refusing {
            use crate::image::crypto::KeySource;
            use crate::image::open::{open_wrapped, ImageFormat};
            let d = disk_dir();
            let key = [0x5cu8; 64];
            let (p, format, keys) = if vhd {
                let p = d.path().join("e.vhd");
                if encrypted {
                    encrypted_vhd(&p, &key);
                } else {
                    crate::image::vhd::ops::create(
                        &p,
                        &crate::image::vhd::ops::CreateOptions::dynamic(32 << 20),
                    )
                    .unwrap();
                }
                let keys = if encrypted {
                    KeySource::Explicit(key.to_vec().into())
                } else {
                    KeySource::default()
                };
                (p, ImageFormat::Vhd, keys)
            } else {
                let p = d.path().join("r.raw");
                std::fs::write(&p, pat(4 << 20, 77).to_vec()).unwrap();
                (p, ImageFormat::Raw, KeySource::default())
            };
            let inj = Injector::new();
            let below = Mutex::new(None);
            let calls: Arc<Mutex<Vec<Access>>> = Arc::default();
            let opts = ChainOptions {
                read_only: false,
                direct: true,
                keys,
                ..Default::default()
            };
            let img: Arc<dyn Image> = open_wrapped(&p, format, &opts, &|f| {
                *lock(&below) = Some(f.clone());
                Ok(Arc::new(FaultFile::new(f, inj.clone())?) as Arc<dyn BlockFile>)
            })
            .unwrap()
            .into();
            let below = lock(&below).take().unwrap();
            let seen = calls.clone();
            inj.watch(move |a| lock(&seen).push(a));
            Refusing {
                img,
                inj,
                calls,
                below,
                base: 0,
                _dir: d,
            }
        }

        /// What the file holds for `n` bytes at virtual sector `sector` (read past the
        /// injector), and what it must hold when `plain` was written there: `plain`
        /// encrypted once with the image's cipher, or `plain` itself.
        fn stored_and_expected(&self, sector: u64, plain: &[u8]) -> (Vec<u8>, Vec<u8>) {
            let map = self.img.direct_map(sector, 1, false).unwrap();
            let mut stored = AlignedBuf::zeroed(plain.len());
            self.below.read_at(&mut stored, map.offset).unwrap();
            let mut want = AlignedBuf::from_slice(plain);
            if let Some(c) = &map.cipher {
                c.encrypt_sectors(sector, &mut want);
            }
            (stored.to_vec(), want.to_vec())
        }

        /// The positional I/O calls since the last look.
        fn calls(&self) -> Vec<(bool, u64, usize)> {
            std::mem::take(&mut *lock(&self.calls))
                .into_iter()
                .map(|a| (a.write, a.offset, a.len))
                .collect()
        }

        /// The file offset of virtual sector `sector`.
        fn offset(&self, sector: u64) -> u64 {
            self.img.direct_map(sector, 1, false).unwrap().offset
        }
    }

    /// `p`: a new 32 MiB dynamic VHD whose key is `key`.
    fn encrypted_vhd(p: &std::path::Path, key: &[u8; 64]) {
        crate::image::vhd::ops::create(
            p,
            &crate::image::vhd::ops::CreateOptions::dynamic(32 << 20),
        )
        .unwrap();
        let meta = crate::image::vhd::VhdImage::open(
            p,
            &crate::image::vhd::VhdOpenOptions {
                read_only: false,
                ..Default::default()
            },
        )
        .unwrap();
        meta.set_keyhash(&crate::image::crypto::KeyHash::for_key(key, &[7u8; 32]))
            .unwrap();
        meta.close().unwrap();
    }

    /// The one completion of `tag`, which must have succeeded, and its data.
    fn data_of<T: Send + std::fmt::Debug + PartialEq + 'static>(
        e: &IoEngine<T>,
        tag: T,
    ) -> AlignedBuf {
        let mut c = wait_all(e, 1);
        assert_eq!(c[0].tag, tag);
        match c.pop().map(|c| c.result) {
            Some(Ok(Output::Data(b))) => b,
            r => panic!("{tag:?}: {r:?}"),
        }
    }

    /// Reads and writes whose submission the kernel refuses with EAGAIN complete on the
    /// workers with the right data, on a raw image and on an encrypted VHD: the file
    /// holds the written bytes encrypted exactly once, a read comes back decrypted
    /// exactly once, and the worker moved the whole transfer at the mapped offset.
    #[test]
    fn reads_and_writes_refused_at_submission_are_done_by_the_workers() {
        for choice in async_engines() {
            for encrypted in [false, true] {
                let r = Refusing::open(encrypted);
                let e = IoEngine::with_engine(2, choice).unwrap();
                let what = format!("{choice:?} encrypted={encrypted}");
                r.inj.arm(Point::Submit, Fault::Eagain);
                let data = pat(16384, 5);
                let write = Op::Write {
                    sector: r.base,
                    buf: data.clone(),
                    fua: false,
                };
                e.submit(1u32, r.img.clone(), write);
                data_of(&e, 1);
                let (stored, want) = r.stored_and_expected(r.base, &data);
                assert!(
                    stored == want,
                    "{what}: the file holds the write, encrypted once"
                );
                assert_eq!(r.calls(), [(true, r.offset(r.base), 16384)], "{what}");
                let read = Op::Read {
                    sector: r.base,
                    buf: AlignedBuf::zeroed(16384),
                };
                e.submit(2, r.img.clone(), read);
                assert!(data_of(&e, 2) == data, "{what}: read back decrypted once");
                assert_eq!(r.calls(), [(false, r.offset(r.base), 16384)], "{what}");
                assert_eq!(r.inj.injected(Point::Submit), 2, "{what}");
                assert_eq!((e.aio_count(), e.aio_refused()), (2, 2), "{what}");
                // Taken again once the kernel takes submissions: the engine, not the workers.
                r.inj.clear();
                let read = Op::Read {
                    sector: r.base,
                    buf: AlignedBuf::zeroed(16384),
                };
                e.submit(3, r.img.clone(), read);
                assert!(data_of(&e, 3) == data, "{what}");
                assert_eq!(r.calls(), [], "{what}");
                assert_eq!((e.aio_count(), e.aio_refused()), (3, 2), "{what}");
            }
        }
    }

    /// A short completion whose rest the kernel refuses at resubmission: the workers move
    /// the rest only (at its own offset: nothing moved twice), the request completes with
    /// the right data, and an encrypted write is in the file encrypted once.
    #[test]
    fn a_short_transfer_whose_rest_is_refused_is_finished_by_the_workers() {
        for choice in async_engines() {
            for encrypted in [false, true] {
                let r = Refusing::open(encrypted);
                let e = IoEngine::with_engine(2, choice).unwrap();
                let what = format!("{choice:?} encrypted={encrypted}");
                // The write's completion moves half, its rest's submission is refused.
                r.inj.arm_n(Point::Data, Fault::Short, 0, Some(1));
                r.inj.arm_n(Point::Submit, Fault::Eagain, 1, Some(1));
                let data = pat(16384, 6);
                let write = Op::Write {
                    sector: r.base + 32,
                    buf: data.clone(),
                    fua: false,
                };
                e.submit(1u32, r.img.clone(), write);
                data_of(&e, 1);
                assert_eq!(
                    (r.inj.injected(Point::Data), r.inj.injected(Point::Submit)),
                    (1, 1),
                    "{what}"
                );
                let (stored, want) = r.stored_and_expected(r.base + 32, &data);
                assert!(
                    stored == want,
                    "{what}: the file holds the write, encrypted once"
                );
                let rest = r.offset(r.base + 32) + 8192;
                assert_eq!(r.calls(), [(true, rest, 8192)], "{what}");
                // The same for a read.
                r.inj.arm_n(Point::Read, Fault::Short, 0, Some(1));
                r.inj.arm_n(Point::Submit, Fault::Eagain, 1, Some(1));
                let read = Op::Read {
                    sector: r.base + 32,
                    buf: AlignedBuf::zeroed(16384),
                };
                e.submit(2, r.img.clone(), read);
                assert!(data_of(&e, 2) == data, "{what}: read back decrypted once");
                assert_eq!(r.inj.injected(Point::Read), 1, "{what}");
                assert_eq!(r.inj.injected(Point::Submit), 2, "{what}");
                assert_eq!(r.calls(), [(false, rest, 8192)], "{what}");
                assert_eq!((e.aio_count(), e.aio_refused()), (2, 2), "{what}");
            }
        }
    }

    /// Only "not now" refusals go to the workers: a submission error that is not (EIO
    /// here; EBADF for real in `aio_errors_and_short_transfers_reach_the_right_request`)
    /// is its own request's error, while the refused request next to it completes.
    #[test]
    fn a_submission_error_that_is_not_for_now_fails_its_own_request() {
        for choice in async_engines() {
            let r = Refusing::open(true);
            let e = IoEngine::with_engine(2, choice).unwrap();
            r.inj.arm_n(Point::Submit, Fault::Eio, 0, Some(1));
            r.inj.arm_n(Point::Submit, Fault::Eagain, 0, Some(1));
            let read = |s| Op::Read {
                sector: s,
                buf: AlignedBuf::zeroed(4096),
            };
            e.submit(1u32, r.img.clone(), read(r.base));
            e.submit(2, r.img.clone(), read(r.base + 8));
            let mut c = wait_all(&e, 2);
            c.sort_by_key(|c| c.tag);
            match &c[0].result {
                Err(err) => assert_eq!(err.errno(), libc::EIO, "{choice:?} {err}"),
                r => panic!("{choice:?} {r:?}"),
            }
            let mut want = vec![0u8; 4096];
            r.img.read(r.base + 8, &mut want).unwrap();
            match &c[1].result {
                Ok(Output::Data(b)) => assert!(b[..] == want[..], "{choice:?}"),
                r => panic!("{choice:?} {r:?}"),
            }
            assert_eq!(r.inj.injected(Point::Submit), 2, "{choice:?}");
            assert_eq!((e.aio_count(), e.aio_refused()), (2, 1), "{choice:?}");
        }
        let logged: Vec<u64> = (1..=1000).filter(|n| power_of_ten(*n)).collect();
        assert_eq!(logged, [1, 10, 100, 1000]);
        for (errno, now) in [
            (libc::EAGAIN, true),
            (libc::ENOMEM, true),
            (libc::EBUSY, true),
            (libc::EINTR, true),
            (libc::EBADF, false),
            (libc::EINVAL, false),
            (libc::EIO, false),
            (libc::ENOSYS, false),
        ] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert_eq!(refused_for_now(&e), now, "{e}");
        }
    }

    // ---- writes that set new VHD bitmap bits: data from the loop, commit on a worker ----

    /// Sectors per block of the test VHDs (2 MiB blocks).
    const SPB: u64 = 4096;

    /// A dynamic VHD whose blocks `blocks` are allocated with only their first sector
    /// written: their bitmaps are cached, so a write to another of their sectors maps to
    /// the file, to be committed.
    fn partly_written(encrypted: bool, blocks: &[u64]) -> Refusing {
        let r = Refusing::wrapped(true, encrypted);
        for &b in blocks {
            r.img.write(b * SPB, &pat(512, b)).unwrap();
            let m = r.img.direct_map(b * SPB + 8, 8, true).unwrap();
            assert!(m.commit, "new bits: mapped to be committed");
        }
        lock(&r.calls).clear();
        r
    }

    /// A 4 KiB write of pattern `seed` at `sector`.
    fn write4k(sector: u64, seed: u64) -> Op {
        Op::Write {
            sector,
            buf: pat(4096, seed),
            fua: false,
        }
    }

    /// Writes to sectors whose bitmap bits are not set yet go out from the loop (their
    /// data on the asynchronous engine), and none is acknowledged before a worker has
    /// committed it: an fdatasync that started after its data landed (invariant 2), then
    /// its block's bitmap. Writes that complete while a commit runs wait for the next, so
    /// 16 writes take at most two fdatasyncs and two bitmap writes, in that order; the
    /// bits and the data (encrypted once) are on disk.
    #[test]
    fn writes_to_new_sectors_go_out_from_the_loop_and_are_committed_in_batches() {
        for choice in async_engines() {
            for encrypted in [false, true] {
                let what = format!("{choice:?} encrypted={encrypted}");
                let r = partly_written(encrypted, &[1]);
                let e = IoEngine::with_engine(2, choice).unwrap();
                // Hold the first fdatasync until released, recording every call.
                let gate = Arc::new((Mutex::new((false, false)), Condvar::new()));
                let (g, seen) = (gate.clone(), r.calls.clone());
                r.inj.watch(move |a| {
                    lock(&seen).push(a);
                    let mut st = lock(&g.0);
                    if a.sync && !st.0 {
                        st.0 = true;
                        g.1.notify_all();
                        while !st.1 {
                            st = g.1.wait(st).unwrap();
                        }
                    }
                });
                let n = 16u64;
                let sector = |k: u64| SPB + 8 + 8 * k;
                for k in 0..n {
                    e.submit(k, r.img.clone(), write4k(sector(k), 100 + k));
                }
                assert_eq!(
                    e.aio_count(),
                    n,
                    "{what}: every write went out from the loop"
                );
                // Reap until the first commit's fdatasync is held and no data write is in
                // flight any more: every write is in the file, none may be acknowledged.
                let t0 = std::time::Instant::now();
                let mut early = Vec::new();
                loop {
                    early.extend(e.completions());
                    let idle = e.aio.as_ref().is_some_and(|a| lock(a).in_flight() == 0);
                    if lock(&gate.0).0 && idle {
                        break;
                    }
                    assert!(t0.elapsed() < std::time::Duration::from_secs(60), "{what}");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                assert!(early.is_empty(), "{what}: acknowledged before committed");
                lock(&gate.0).1 = true;
                gate.1.notify_all();
                let mut tags: Vec<u64> = wait_all(&e, n as usize)
                    .into_iter()
                    .map(|c| {
                        assert!(c.result.is_ok(), "{what}: {:?}", c.result);
                        c.tag
                    })
                    .collect();
                tags.sort_unstable();
                assert_eq!(tags, (0..n).collect::<Vec<_>>(), "{what}");
                // The calls: (fdatasync, bitmap write) once or twice; no data write (the
                // data went to the kernel asynchronously).
                let calls = std::mem::take(&mut *lock(&r.calls));
                let syncs = calls.iter().filter(|a| a.sync).count();
                assert!((1..=2).contains(&syncs), "{what}: {calls:?}");
                let bm = calls[1].offset;
                for pair in calls.chunks(2) {
                    assert!(pair[0].sync, "{what}: {calls:?}");
                    assert_eq!((pair[1].write, pair[1].offset), (true, bm), "{what}");
                }
                // On disk: the bits of sector 0 and of the 16 writes, and the data.
                let mut ondisk = AlignedBuf::zeroed(512);
                r.below.read_at(&mut ondisk, bm).unwrap();
                assert_eq!(ondisk[0], 0x80, "{what}");
                assert!(ondisk[1..=n as usize].iter().all(|&b| b == 0xff), "{what}");
                assert_eq!(ondisk[n as usize + 1], 0, "{what}");
                for k in 0..n {
                    let (stored, want) = r.stored_and_expected(sector(k), &pat(4096, 100 + k));
                    assert!(stored == want, "{what}: write {k} in the file");
                }
                // Now a plain fast-path write: nothing to commit, no call.
                e.submit(99, r.img.clone(), write4k(sector(0), 7));
                data_of(&e, 99);
                assert_eq!(r.calls(), [], "{what}");
            }
        }
    }

    /// The first write to a block of the reserve is allocated on the loop (in memory, by
    /// `direct_map`), its data goes out from the loop, and its commit writes the block's
    /// bitmap and the BAT sector pointing at it, after the fdatasync: no positional data
    /// write, no worker allocation. A reopen (buffered, no cache) finds the blocks and the
    /// data.
    #[test]
    fn first_writes_to_blocks_are_allocated_on_the_loop() {
        use crate::image::chain::open_vhd_chain;
        use crate::image::crypto::KeySource;
        for choice in async_engines() {
            for encrypted in [false, true] {
                let what = format!("{choice:?} encrypted={encrypted}");
                // Block 0 by a worker: it grows the reserve (8 blocks).
                let r = partly_written(encrypted, &[0]);
                let e = IoEngine::with_engine(2, choice).unwrap();
                let bat0 = r.inj.seen(Point::Bat);
                for b in 1..4u64 {
                    e.submit(b, r.img.clone(), write4k(b * SPB + 8, 50 + b));
                }
                for c in wait_all(&e, 3) {
                    assert!(c.result.is_ok(), "{what}: {:?}", c.result);
                }
                assert_eq!(e.aio_count(), 3, "{what}: from the loop");
                let bats = r.inj.seen(Point::Bat) - bat0;
                assert!((1..=3).contains(&bats), "{what}: {bats} BAT writes");
                // Positional writes: bitmaps and BAT sectors only (the data, 4 KiB each,
                // went to the kernel asynchronously), each batch after its fdatasync.
                let calls = std::mem::take(&mut *lock(&r.calls));
                assert!(calls[0].sync, "{what}: the sync first: {calls:?}");
                assert!(
                    calls.iter().all(|a| a.sync || (a.write && a.len <= 512)),
                    "{what}: {calls:?}"
                );
                r.img.close().unwrap();
                let keys = if encrypted {
                    KeySource::Explicit([0x5cu8; 64].to_vec().into())
                } else {
                    KeySource::default()
                };
                let p = r._dir.path().join("e.vhd");
                let back = open_vhd_chain(
                    &p,
                    &ChainOptions {
                        keys,
                        ..Default::default()
                    },
                )
                .unwrap();
                assert_eq!(back.allocated_blocks(), 4, "{what}");
                for b in 1..4u64 {
                    let mut got = vec![0u8; 4096];
                    back.read(b * SPB + 8, &mut got).unwrap();
                    assert!(got[..] == pat(4096, 50 + b)[..], "{what}: block {b}");
                }
            }
        }
    }

    /// A commit that fails fails only the writes it covers: a failed bitmap write those of
    /// one block (the other block's writes succeed); a failed fdatasync the writes whose
    /// bits it was to guard (and, the failure being sticky until a reopen, every later
    /// write that sets new bits), whose bits stay clear (the sectors read from below).
    #[test]
    fn a_failed_commit_fails_only_the_writes_it_covers() {
        for choice in async_engines() {
            let r = partly_written(false, &[1, 2]);
            let e = IoEngine::with_engine(2, choice).unwrap();
            r.inj.arm_n(Point::Bitmap, Fault::Eio, 0, Some(1));
            for k in 0..4u64 {
                e.submit(k, r.img.clone(), write4k(SPB + 8 + 8 * k, k));
                e.submit(10 + k, r.img.clone(), write4k(2 * SPB + 8 + 8 * k, k));
            }
            let failed: Vec<u64> = wait_all(&e, 8)
                .into_iter()
                .filter(|c| c.result.is_err())
                .map(|c| c.tag)
                .collect();
            assert_eq!(r.inj.injected(Point::Bitmap), 1, "{choice:?}");
            assert!(!failed.is_empty(), "{choice:?}");
            assert!(
                failed.iter().all(|t| *t < 10) || failed.iter().all(|t| *t >= 10),
                "{choice:?}: one block's writes failed: {failed:?}"
            );
            r.inj.clear();
            r.inj.arm_n(Point::Sync, Fault::Eio, 0, Some(1));
            let fresh = [SPB + 512, 2 * SPB + 512];
            for (t, s) in fresh.iter().enumerate() {
                e.submit(20 + t as u64, r.img.clone(), write4k(*s, 5));
            }
            for c in wait_all(&e, 2) {
                match c.result {
                    Err(err) => assert_eq!(err.errno(), libc::EIO, "{choice:?}"),
                    Ok(_) => panic!("{choice:?}: write {} acknowledged", c.tag),
                }
            }
            assert_eq!(r.inj.injected(Point::Sync), 1, "{choice:?}");
            for s in fresh {
                assert!(
                    r.img.direct_map(s, 8, false).is_none(),
                    "{choice:?}: the bits of sector {s} stay clear"
                );
            }
        }
    }

    /// A write to new sectors whose submission the kernel refuses for now: a worker moves
    /// the data, then commits it as the loop would have (fdatasync, then the bitmap).
    #[test]
    fn a_refused_write_to_new_sectors_is_committed_by_the_worker() {
        for choice in async_engines() {
            for encrypted in [false, true] {
                let what = format!("{choice:?} encrypted={encrypted}");
                let r = partly_written(encrypted, &[1]);
                let e = IoEngine::with_engine(2, choice).unwrap();
                r.inj.arm(Point::Submit, Fault::Eagain);
                let s = SPB + 64;
                e.submit(1u32, r.img.clone(), write4k(s, 3));
                data_of(&e, 1);
                assert_eq!(e.aio_refused(), 1, "{what}");
                r.inj.clear();
                let data_at = r.offset(s);
                let calls = std::mem::take(&mut *lock(&r.calls));
                let kinds: Vec<_> = calls
                    .iter()
                    .map(|a| (a.sync, a.write, a.offset == data_at, a.len))
                    .collect();
                assert_eq!(
                    kinds,
                    [
                        (false, true, true, 4096),
                        (true, false, false, 0),
                        (false, true, false, 512)
                    ],
                    "{what}: data, fdatasync, bitmap"
                );
                let (stored, want) = r.stored_and_expected(s, &pat(4096, 3));
                assert!(stored == want, "{what}");
            }
        }
    }

    /// A raw image whose writes are all mapped to be committed, and whose first commit
    /// panics (as a panicking `BlockFile` would in a VHD's bitmap write).
    #[derive(Debug)]
    struct PanicsOnce(RawImage, std::sync::atomic::AtomicBool);

    impl Image for PanicsOnce {
        pass_on_image!();
        fn block_status(&self, sector: u64, n: u64) -> Result<Vec<Extent>, ImageError> {
            self.0.block_status(sector, n)
        }
        fn direct_map(&self, sector: u64, n: u64, write: bool) -> Option<DirectMap> {
            let mut m = self.0.direct_map(sector, n, write)?;
            m.commit = write;
            Some(m)
        }
        fn commit_writes(&self, ranges: &[(u64, u64)]) -> Vec<Result<(), ImageError>> {
            if !self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
                panic!("test: the first commit panics");
            }
            ranges.iter().map(|_| Ok(())).collect()
        }
    }

    /// A commit that panics takes its batch's completions and its worker with it (as any
    /// panicking job does), but not the image's commit queue: the next write to be
    /// committed still completes.
    #[test]
    fn a_panicking_commit_does_not_hold_up_the_next_one() {
        for choice in async_engines() {
            let d = disk_dir();
            let p = d.path().join("p.raw");
            std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
            let raw = RawImage::open_with(&p, false, true).unwrap();
            let panicky = Arc::new(PanicsOnce(raw, false.into()));
            let img: Arc<dyn Image> = panicky.clone();
            let e = IoEngine::with_engine(2, choice).unwrap();
            e.submit(1u32, img.clone(), write4k(0, 1));
            // The first batch panics: wait until it has run.
            let ran = &panicky.1;
            let t0 = Instant::now();
            while !ran.load(std::sync::atomic::Ordering::SeqCst) {
                assert!(e.completions().is_empty(), "{choice:?}");
                assert!(t0.elapsed() < Duration::from_secs(10), "{choice:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
            e.submit(2, img.clone(), write4k(8, 2));
            assert_eq!(data_of(&e, 2).len(), 4096, "{choice:?}");
            assert_eq!(e.aio_count(), 2, "{choice:?}");
        }
    }

    #[test]
    fn engine_choice_from_the_environment() {
        use std::ffi::OsStr;
        let c = |io: Option<&str>, aio: Option<&str>| {
            EngineChoice::from_env(io.map(OsStr::new), aio.map(OsStr::new))
        };
        assert_eq!(c(None, None).unwrap(), EngineChoice::Auto);
        assert_eq!(c(None, Some("1")).unwrap(), EngineChoice::Auto);
        assert_eq!(c(None, Some("0")).unwrap(), EngineChoice::Threads);
        assert_eq!(c(Some("uring"), None).unwrap(), EngineChoice::Uring);
        assert_eq!(c(Some(" IO_URING\n"), None).unwrap(), EngineChoice::Uring);
        assert_eq!(c(Some("aio"), Some("0")).unwrap(), EngineChoice::Aio);
        assert_eq!(c(Some("threads"), None).unwrap(), EngineChoice::Threads);
        assert_eq!(c(Some("auto"), Some("0")).unwrap(), EngineChoice::Auto);
        let e = c(Some("spdk"), None).unwrap_err();
        assert!(e.to_string().contains("\"spdk\""), "{e}");
        assert_eq!(
            EngineChoice::Uring.order(),
            [aio::Kind::Uring, aio::Kind::Aio]
        );
        assert!(EngineChoice::Threads.order().is_empty());
    }

    /// Setup failures injected for the interfaces in `refuse` (with `errno`, as a 4.14
    /// kernel answers io_uring_setup with ENOSYS and a disabled io_uring with EPERM): the
    /// next interface runs, the log line says why, and I/O still gets done.
    #[test]
    fn setup_failures_fall_back_io_uring_to_aio_to_workers() {
        let d = disk_dir();
        let p = d.path().join("f.raw");
        std::fs::write(&p, pat(1 << 20, 9).to_vec()).unwrap();
        let img: Arc<dyn Image> = Arc::new(RawImage::open_with(&p, false, true).unwrap());
        /// The choice, the interfaces refused and with which errno, what runs, the line.
        type Case = (
            EngineChoice,
            &'static [aio::Kind],
            i32,
            Option<aio::Kind>,
            &'static str,
        );
        let cases: [Case; 5] = [
            (
                EngineChoice::Uring,
                &[aio::Kind::Uring],
                libc::ENOSYS,
                Some(aio::Kind::Aio),
                "I/O engine: Linux AIO from the event loop for mapped reads and writes \
                 (io_uring: Function not implemented (os error 38) unavailable)",
            ),
            (
                EngineChoice::Uring,
                &[aio::Kind::Uring, aio::Kind::Aio],
                libc::EPERM,
                None,
                "I/O engine: worker threads for every read and write (io_uring: Operation \
                 not permitted (os error 1); Linux AIO: Operation not permitted (os error 1) \
                 unavailable)",
            ),
            (
                EngineChoice::Aio,
                &[aio::Kind::Aio],
                libc::ENOSYS,
                None,
                "I/O engine: worker threads for every read and write (Linux AIO: Function \
                 not implemented (os error 38) unavailable)",
            ),
            (
                EngineChoice::Aio,
                &[aio::Kind::Uring],
                libc::EPERM,
                Some(aio::Kind::Aio),
                "I/O engine: Linux AIO from the event loop for mapped reads and writes",
            ),
            (
                EngineChoice::Threads,
                &[],
                0,
                None,
                "I/O engine: worker threads for every read and write (switched off)",
            ),
        ];
        for (i, (choice, refuse, errno, runs, line)) in cases.into_iter().enumerate() {
            let mut e = IoEngine::<u64>::with_engine(1, EngineChoice::Threads).unwrap();
            let tried = Mutex::new(Vec::new());
            let setup = |kind, fd: std::os::fd::BorrowedFd<'_>| {
                lock(&tried).push(kind);
                if refuse.contains(&kind) {
                    Err(std::io::Error::from_raw_os_error(errno))
                } else {
                    aio::Engine::new(kind, 8, fd)
                }
            };
            assert_eq!(e.set_engine_with(choice, &setup), line, "case {i}");
            assert_eq!(e.engine(), runs, "case {i}");
            let want_tried: Vec<_> = match runs {
                Some(k) => choice
                    .order()
                    .iter()
                    .copied()
                    .take_while(|t| *t != k)
                    .chain([k])
                    .collect(),
                None => choice.order().to_vec(),
            };
            assert_eq!(*lock(&tried), want_tried, "case {i}");
            // Reads and writes work whatever runs, on the engine that runs.
            let w = pat(8192, i as u64);
            e.submit(
                1,
                img.clone(),
                Op::Write {
                    sector: 16,
                    buf: w.clone(),
                    fua: false,
                },
            );
            assert!(wait_all(&e, 1)[0].result.is_ok(), "case {i}");
            e.submit(
                2,
                img.clone(),
                Op::Read {
                    sector: 16,
                    buf: AlignedBuf::zeroed(8192),
                },
            );
            let c = wait_all(&e, 1);
            assert!(
                matches!(&c[0].result, Ok(Output::Data(b)) if *b == w),
                "case {i}"
            );
            assert_eq!(
                e.aio_count(),
                if runs.is_some() { 2 } else { 0 },
                "case {i}"
            );
        }
    }

    #[test]
    fn the_fair_queue_takes_turns_between_keys_and_keeps_each_key_in_order() {
        let mut q = FairQueue::default();
        for i in 0..4 {
            q.push(1, (1, i));
        }
        q.push(2, (2, 0));
        q.push(2, (2, 1));
        q.push(3, (3, 0));
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            [(1, 0), (2, 0), (3, 0), (1, 1), (2, 1), (1, 2), (1, 3)]
        );
        assert!(q.pop().is_none());
        // A key that comes back after its queue emptied joins at the back.
        q.push(1, (1, 9));
        q.push(2, (2, 9));
        assert_eq!(q.pop(), Some((1, 9)));
        assert_eq!(q.pop(), Some((2, 9)));
    }

    #[test]
    fn a_backlog_on_one_image_does_not_hold_back_another_image() {
        // One worker, held by a task until both images' jobs are queued: 16 reads of the
        // flooding image, then one of the quiet one.
        let mut e = IoEngine::with_engine(1, EngineChoice::Threads).unwrap();
        e.set_inline(false);
        let busy: Arc<dyn Image> = Arc::new(MemImage::new(64, false));
        let quiet: Arc<dyn Image> = Arc::new(MemImage::new(64, false));
        let (release, held) = std::sync::mpsc::channel::<()>();
        e.run(
            0u32,
            Box::new(move || {
                let _ = held.recv();
                Ok(Output::Done)
            }),
        );
        let read = || Op::Read {
            sector: 0,
            buf: AlignedBuf::zeroed(512),
        };
        for i in 0..16 {
            e.submit(100 + i, Arc::clone(&busy), read());
        }
        e.submit(200, Arc::clone(&quiet), read());
        release.send(()).unwrap();
        let done = wait_all(&e, 18);
        let at = done.iter().position(|c| c.tag == 200).unwrap();
        // The task, then one job of each image in turn: the quiet read is third (17th,
        // last, in one first-in first-out queue).
        assert_eq!(
            at,
            2,
            "{:?}",
            done.iter().map(|c| c.tag).collect::<Vec<_>>()
        );
        let busy_order: Vec<u32> = done
            .iter()
            .map(|c| c.tag)
            .filter(|t| (100..200).contains(t))
            .collect();
        assert_eq!(
            busy_order,
            (100..116).collect::<Vec<_>>(),
            "one image's jobs stay in order"
        );
    }
}
