//! `oxccl._oxccl`: the native part of the `oxccl` Python package.
//!
//! It takes buffers as (address, element count, data type name): the pure-Python layer
//! (`oxccl/_buffers.py`) finds them in numpy arrays, torch tensors and anything with the
//! buffer protocol, checks them, and keeps the objects alive while a call uses them. Every
//! blocking call runs with the GIL released; Ctrl-C aborts the communicator of a blocking
//! call (see `interrupt.rs`), and the call then raises `KeyboardInterrupt`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use oxccl::bootstrap::{LaunchEnv, StoreAddr};
use oxccl::{Communicator, Config, DataType, Error, RawBuf, RawCall, ReduceOp, TrafficClass};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

mod interrupt;
mod pystore;

/// A buffer from Python: address, element count, data type name.
/// A buffer as the Python layer describes it: (address, element count, type name), and the
/// GPU ordinal for a CUDA tensor's memory.
#[derive(FromPyObject)]
enum Buf {
    Gpu(usize, usize, String, u32),
    Host(usize, usize, String),
}

fn dtype(name: &str) -> PyResult<DataType> {
    name.parse::<DataType>().map_err(|e| PyValueError::new_err(e.to_string()))
}

fn raw(b: &Buf) -> PyResult<RawBuf> {
    Ok(match b {
        Buf::Host(addr, count, t) => RawBuf::host(std::ptr::with_exposed_provenance::<u8>(*addr), *count, dtype(t)?),
        Buf::Gpu(addr, count, t, n) => {
            RawBuf { addr: *addr, count: *count, dtype: dtype(t)?, kind: oxccl::MemKind::Device(*n) }
        }
    })
}

fn op(name: &str) -> PyResult<ReduceOp> {
    name.parse::<ReduceOp>().map_err(|e| PyValueError::new_err(e.to_string()))
}

fn class_of(n: &str) -> PyResult<TrafficClass> {
    TrafficClass::parse(n).ok_or_else(|| {
        let names: Vec<&str> = TrafficClass::ALL.iter().map(|c| c.name()).collect();
        PyValueError::new_err(format!("traffic_class={n:?}: expected one of {}", names.join(", ")))
    })
}

fn seconds(t: f64) -> PyResult<Duration> {
    if !(t.is_finite() && t > 0.0) {
        return Err(PyValueError::new_err(format!("timeout={t}: expected a number of seconds above zero")));
    }
    Duration::try_from_secs_f64(t).map_err(|e| PyValueError::new_err(format!("timeout={t}: {e}")))
}

/// The Python exception for `e`: a class of `oxccl.errors`, with the same words (and the
/// rank, for a remote failure).
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let (class, rank) = match &e {
        Error::InvalidArgument(_) => ("InvalidArgumentError", None),
        Error::InvalidUsage(_) => ("InvalidUsageError", None),
        Error::Remote { rank, .. } => ("RemoteError", Some(*rank)),
        Error::Timeout { .. } => ("TimeoutError", None),
        Error::Transport { .. } => ("TransportError", None),
        Error::Store(_) => ("StoreError", None),
        Error::Aborted(_) => ("AbortedError", None),
        Error::Unsupported(_) => ("UnsupportedError", None),
        Error::Cuda { .. } => ("CudaError", None),
        _ => ("InternalError", None),
    };
    let made = (|| -> PyResult<PyErr> {
        let cls = py.import("oxccl.errors")?.getattr(class)?;
        let exc = cls.call1((e.to_string(),))?;
        if let Some(r) = rank {
            exc.setattr("rank", r)?;
        }
        Ok(PyErr::from_value(exc))
    })();
    made.unwrap_or_else(|err| err)
}

/// A communicator.
#[pyclass(frozen, module = "oxccl._oxccl")]
struct Comm {
    inner: Arc<Communicator>,
}

impl Comm {
    /// Runs `f` with the GIL released, under `timeout` (seconds) when given; Ctrl-C meanwhile
    /// aborts the communicator and raises `KeyboardInterrupt`.
    fn blocking<R: Send>(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        f: impl FnOnce(&Communicator) -> oxccl::Result<R> + Send,
    ) -> PyResult<R> {
        let t = timeout.map(seconds).transpose()?;
        let busy = interrupt::Busy::enter(&self.inner);
        let c = &*self.inner;
        let r = py.detach(|| match t {
            Some(t) => c.with_timeout(t, f),
            None => f(c),
        });
        drop(busy);
        py.check_signals()?;
        r.map_err(|e| to_py(py, e))
    }
}

/// Runs `f` (making a communicator) on a thread of its own while this one waits with the GIL
/// released, looking for Ctrl-C every 100 ms: creation has no communicator to abort yet, so
/// Ctrl-C raises `KeyboardInterrupt` at once and the creation ends by itself (at its
/// deadline at the latest; what it made is then closed).
fn interruptible(py: Python<'_>, f: impl FnOnce() -> oxccl::Result<Communicator> + Send + 'static) -> PyResult<Comm> {
    let (tx, rx) = std::sync::mpsc::channel();
    let rx = Mutex::new(rx);
    std::thread::Builder::new()
        .name("oxccl-create".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| PyValueError::new_err(format!("cannot start the creating thread: {e}")))?;
    loop {
        let next = py.detach(|| rx.lock().unwrap_or_else(|e| e.into_inner()).recv_timeout(Duration::from_millis(100)));
        match next {
            Ok(r) => return r.map(|c| Comm { inner: Arc::new(c) }).map_err(|e| to_py(py, e)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => py.check_signals()?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(to_py(py, Error::Internal("the creating thread ended without an answer".into())))
            }
        }
    }
}

fn call_of(
    name: &str,
    reduce: Option<&str>,
    root: usize,
    counts: Option<(Vec<usize>, Vec<usize>)>,
    roots: Option<Vec<usize>>,
) -> PyResult<RawCall> {
    let need_op = || -> PyResult<ReduceOp> {
        op(reduce.ok_or_else(|| PyValueError::new_err(format!("{name} needs a reduce op")))?)
    };
    Ok(match name {
        "all_reduce" => RawCall::AllReduce { op: need_op()? },
        "broadcast" => RawCall::Broadcast { root },
        "broadcast_from_roots" => RawCall::BroadcastRoots {
            roots: roots.ok_or_else(|| PyValueError::new_err("broadcast_from_roots needs its roots"))?,
        },
        "reduce" => RawCall::Reduce { op: need_op()?, root },
        "all_gather" => RawCall::AllGather,
        "reduce_scatter" => RawCall::ReduceScatter { op: need_op()? },
        "all_to_all" => RawCall::AllToAll,
        "all_to_all_v" => {
            let (send_counts, recv_counts) =
                counts.ok_or_else(|| PyValueError::new_err("all_to_all_v needs send and receive counts"))?;
            RawCall::AllToAllV { send_counts, recv_counts }
        }
        "barrier" => RawCall::Barrier,
        _ => return Err(PyValueError::new_err(format!("unknown collective {name:?}"))),
    })
}

#[pymethods]
impl Comm {
    /// The communicator of every rank, from the launcher's environment (`oxccl launch`,
    /// torchrun, srun, mpirun).
    #[staticmethod]
    fn from_env(py: Python<'_>) -> PyResult<Comm> {
        interrupt::install();
        interruptible(py, Communicator::from_env)
    }

    /// Rank `rank` of `world_size`, meeting through the store at `store` (`host:port`,
    /// `tcp://host:port`, `file:///dir`); rank 0 hosts a TCP store unless `store_hosted`.
    #[staticmethod]
    #[pyo3(signature = (rank, world_size, store, store_hosted = false, timeout = None))]
    fn create(
        py: Python<'_>,
        rank: usize,
        world_size: usize,
        store: &str,
        store_hosted: bool,
        timeout: Option<f64>,
    ) -> PyResult<Comm> {
        interrupt::install();
        let addr = StoreAddr::parse(store).map_err(|e| to_py(py, e))?;
        let mut cfg = Config::from_env().map_err(|e| to_py(py, e))?;
        if let Some(t) = timeout {
            let t = seconds(t)?;
            cfg.set("OXCCL_TIMEOUT", &format!("{}ms", t.as_millis().max(1))).map_err(|e| to_py(py, e))?;
        }
        if world_size == 0 || rank >= world_size {
            return Err(to_py(
                py,
                Error::invalid_arg(format!("rank {rank} is out of range for a world of {world_size} ranks")),
            ));
        }
        let env = LaunchEnv {
            rank,
            world_size,
            local_rank: None,
            local_world_size: None,
            store: Some(addr),
            store_hosted,
            launcher: "python",
        };
        interruptible(py, move || Communicator::from_launch_env(&env, cfg))
    }

    /// Rank `rank` of `world_size`, meeting through `store`, a Python object with the
    /// methods of torch's c10d store (what torch hands a process-group backend).
    #[staticmethod]
    #[pyo3(signature = (store, rank, world_size, timeout = None, traffic_class = None))]
    fn from_store(
        py: Python<'_>,
        store: Py<PyAny>,
        rank: usize,
        world_size: usize,
        timeout: Option<f64>,
        traffic_class: Option<&str>,
    ) -> PyResult<Comm> {
        interrupt::install();
        let mut cfg = Config::from_env().map_err(|e| to_py(py, e))?;
        if let Some(t) = timeout {
            let t = seconds(t)?;
            cfg.set("OXCCL_TIMEOUT", &format!("{}ms", t.as_millis().max(1))).map_err(|e| to_py(py, e))?;
        }
        if let Some(c) = traffic_class {
            class_of(c)?;
            cfg.set("OXCCL_CLASS", c).map_err(|e| to_py(py, e))?;
        }
        let store: Arc<dyn oxccl::Store> = Arc::new(pystore::PyStore::new(store));
        interruptible(py, move || Communicator::init(store, rank, world_size, cfg))
    }

    #[getter]
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    #[getter]
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    #[getter]
    fn timeout(&self) -> f64 {
        self.inner.timeout().as_secs_f64()
    }

    fn set_timeout(&self, py: Python<'_>, seconds_: f64) -> PyResult<()> {
        self.inner.set_timeout(seconds(seconds_)?).map_err(|e| to_py(py, e))
    }

    #[getter]
    fn traffic_class(&self) -> &'static str {
        self.inner.class().name()
    }

    #[getter]
    fn aborted(&self) -> bool {
        self.inner.is_aborted()
    }

    /// A collective, blocking: `name` as the Rust call's, buffers as (address, count, type).
    #[pyo3(signature = (name, send, recv, reduce = None, root = 0, counts = None, timeout = None, roots = None))]
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        py: Python<'_>,
        name: &str,
        send: Buf,
        recv: Buf,
        reduce: Option<&str>,
        root: usize,
        counts: Option<(Vec<usize>, Vec<usize>)>,
        timeout: Option<f64>,
        roots: Option<Vec<usize>>,
    ) -> PyResult<()> {
        let call = call_of(name, reduce, root, counts, roots)?;
        let (s, r) = (raw(&send)?, raw(&recv)?);
        // SAFETY: the Python layer keeps the objects behind both buffers alive (and checked
        // their sizes, writability and contiguity) until this call returns.
        self.blocking(py, timeout, move |c| unsafe { c.call_raw(&call, s, r) })
    }

    /// A collective, queued: returns a [`Work`] that keeps `keep` (the buffers' objects) alive
    /// until the operation has completed.
    #[pyo3(signature = (name, send, recv, keep, reduce = None, root = 0, counts = None, roots = None))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        name: &str,
        send: Buf,
        recv: Buf,
        keep: Py<PyAny>,
        reduce: Option<&str>,
        root: usize,
        counts: Option<(Vec<usize>, Vec<usize>)>,
        roots: Option<Vec<usize>>,
    ) -> PyResult<Work> {
        let call = call_of(name, reduce, root, counts, roots)?;
        let (s, r) = (raw(&send)?, raw(&recv)?);
        // SAFETY: the Work keeps `keep` (the objects owning both buffers) alive until the
        // operation completed, also when the Work is dropped first (see Work's Drop).
        let w = unsafe { self.inner.submit_raw(&call, s, r) }.map_err(|e| to_py(py, e))?;
        Ok(Work::new(w, keep, self.inner.clone()))
    }

    /// A collective on GPU buffers, queued on the CUDA stream `stream` (NCCL's ordering: it
    /// starts after the stream's earlier work and holds its later work until it ends);
    /// returns a [`Work`] that keeps `keep` alive until then.
    #[pyo3(signature = (name, send, recv, keep, stream, reduce = None, root = 0, counts = None, roots = None))]
    #[allow(clippy::too_many_arguments)]
    fn submit_on_stream(
        &self,
        py: Python<'_>,
        name: &str,
        send: Buf,
        recv: Buf,
        keep: Py<PyAny>,
        stream: usize,
        reduce: Option<&str>,
        root: usize,
        counts: Option<(Vec<usize>, Vec<usize>)>,
        roots: Option<Vec<usize>>,
    ) -> PyResult<Work> {
        let call = call_of(name, reduce, root, counts, roots)?;
        let (s, r) = (raw(&send)?, raw(&recv)?);
        // SAFETY: the Work keeps `keep` (the tensors) alive until the operation ended; the
        // stream is the tensors' device's current stream, given by torch.
        let w = unsafe { self.inner.submit_on_stream(&call, s, r, oxccl::StreamHandle(stream)) }
            .map_err(|e| to_py(py, e))?;
        Ok(Work::new(w, keep, self.inner.clone()))
    }

    /// A send or receive of a GPU buffer queued on the CUDA stream `stream`.
    #[pyo3(signature = (send, buf, peer, keep, stream))]
    fn p2p_on_stream(
        &self,
        py: Python<'_>,
        send: bool,
        buf: Buf,
        peer: usize,
        keep: Py<PyAny>,
        stream: usize,
    ) -> PyResult<Work> {
        let b = raw(&buf)?;
        // SAFETY: as in `submit_on_stream`.
        let w = unsafe {
            if send {
                self.inner.send_on_stream(b, peer, oxccl::StreamHandle(stream))
            } else {
                self.inner.recv_on_stream(b, peer, oxccl::StreamHandle(stream))
            }
        }
        .map_err(|e| to_py(py, e))?;
        Ok(Work::new(w, keep, self.inner.clone()))
    }

    /// `all_to_all_v_dynamic`, blocking: the receive counts travel with the blocks; returns
    /// them (elements from each rank). Both buffers hold the same element type.
    #[pyo3(signature = (send, send_counts, recv, timeout = None))]
    fn all_to_all_v_dynamic(
        &self,
        py: Python<'_>,
        send: Buf,
        send_counts: Vec<usize>,
        recv: Buf,
        timeout: Option<f64>,
    ) -> PyResult<Vec<usize>> {
        let (s, r) = (raw(&send)?, raw(&recv)?);
        if s.kind != oxccl::MemKind::Host || r.kind != oxccl::MemKind::Host {
            return Err(to_py(
                py,
                Error::Unsupported("all_to_all_v_dynamic takes host buffers (CPU tensors, arrays) for now".into()),
            ));
        }
        if s.dtype != r.dtype {
            return Err(to_py(
                py,
                Error::invalid_arg(format!("all_to_all_v_dynamic: send holds {} but recv holds {}", s.dtype, r.dtype)),
            ));
        }
        // Only bytes move: the call runs on bytes, counts scaled by the element size.
        let es = s.dtype.size();
        let too_big = || to_py(py, Error::invalid_arg("all_to_all_v_dynamic: the counts overflow"));
        let byte_counts: Vec<usize> =
            send_counts.iter().map(|&c| c.checked_mul(es)).collect::<Option<_>>().ok_or_else(too_big)?;
        let (sb, rb) = (s.bytes().ok_or_else(too_big)?, r.bytes().ok_or_else(too_big)?);
        let (sp, rp) = (s.addr, r.addr);
        let got = self.blocking(py, timeout, move |c| {
            // SAFETY: the Python layer keeps both objects alive (and checked their sizes,
            // writability and contiguity) until this call returns.
            let (sv, rv) = unsafe {
                (
                    std::slice::from_raw_parts(std::ptr::with_exposed_provenance::<u8>(sp), sb),
                    std::slice::from_raw_parts_mut(std::ptr::with_exposed_provenance_mut::<u8>(rp), rb),
                )
            };
            c.all_to_all_v_dynamic(sv, &byte_counts, rv)
        })?;
        Ok(got.into_iter().map(|b| b / es).collect())
    }

    /// Send or receive, blocking. A tag travels with the message and is checked by the
    /// receive (messages still match in call order).
    #[pyo3(signature = (send, buf, peer, timeout = None, tag = 0))]
    fn p2p(&self, py: Python<'_>, send: bool, buf: Buf, peer: usize, timeout: Option<f64>, tag: u32) -> PyResult<()> {
        let b = raw(&buf)?;
        // SAFETY: the Python layer keeps the buffer's object alive until this call returns
        // (a tagged one waits for its work inside the call).
        self.blocking(py, timeout, move |c| unsafe {
            match (send, tag) {
                (true, 0) => c.send_raw(b, peer),
                (false, 0) => c.recv_raw(b, peer),
                (true, t) => c.send_async_raw_tagged(b, peer, t)?.wait(),
                (false, t) => c.recv_async_raw_tagged(b, peer, t)?.wait(),
            }
        })
    }

    /// Send or receive, non-blocking (progresses on its own, in order per peer and direction).
    #[pyo3(signature = (send, buf, peer, keep, tag = 0))]
    fn p2p_async(
        &self,
        py: Python<'_>,
        send: bool,
        buf: Buf,
        peer: usize,
        keep: Py<PyAny>,
        tag: u32,
    ) -> PyResult<Work> {
        let b = raw(&buf)?;
        // SAFETY: the Work keeps `keep` alive until the operation completed.
        let w = unsafe {
            if send {
                self.inner.send_async_raw_tagged(b, peer, tag)
            } else {
                self.inner.recv_async_raw_tagged(b, peer, tag)
            }
        }
        .map_err(|e| to_py(py, e))?;
        Ok(Work::new(w, keep, self.inner.clone()))
    }

    /// Sends and receives posted together: `ops` is a list of (is_send, buffer, peer).
    #[pyo3(signature = (ops, timeout = None))]
    fn group(&self, py: Python<'_>, ops: Vec<(bool, Buf, usize)>, timeout: Option<f64>) -> PyResult<()> {
        let ops: Vec<(bool, RawBuf, usize)> =
            ops.iter().map(|(s, b, p)| Ok((*s, raw(b)?, *p))).collect::<PyResult<_>>()?;
        self.blocking(py, timeout, move |c| {
            let mut g = c.group();
            for (send, b, peer) in ops {
                // SAFETY: the Python layer keeps every buffer's object alive until this call
                // returns, which is after `run`.
                unsafe {
                    if send {
                        g.send_raw(b, peer)?;
                    } else {
                        g.recv_raw(b, peer)?;
                    }
                }
            }
            g.run()
        })
    }

    /// Splits, as `MPI_Comm_split`; `None` as color takes no part (returns `None`).
    #[pyo3(signature = (color, key, traffic_class = None))]
    fn split(
        &self,
        py: Python<'_>,
        color: Option<u32>,
        key: i64,
        traffic_class: Option<&str>,
    ) -> PyResult<Option<Comm>> {
        let class = traffic_class.map(class_of).transpose()?;
        let r = self.blocking(py, None, move |c| match class {
            Some(class) => c.split_with_class(color, key, class),
            None => c.split(color, key),
        })?;
        Ok(r.map(|c| Comm { inner: Arc::new(c) }))
    }

    /// A new communicator of every rank but `excluded` (after a failure).
    fn shrink(&self, py: Python<'_>, excluded: Vec<usize>) -> PyResult<Comm> {
        let c = self.blocking(py, None, move |c| c.shrink(&excluded))?;
        Ok(Comm { inner: Arc::new(c) })
    }

    /// Ends every operation in flight and every later one with `AbortedError`; never blocks.
    fn abort(&self) {
        self.inner.abort();
    }

    /// The orderly end (every rank calls it).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let c = &*self.inner;
        py.detach(|| c.close()).map_err(|e| to_py(py, e))
    }

    /// What this rank's links are and why, as JSON (the GIL released: it takes the
    /// communicator's lock, which an abort may hold while it writes to a Python store).
    fn explain_json(&self, py: Python<'_>) -> PyResult<String> {
        let c = &*self.inner;
        let x = py.detach(|| c.explain());
        serde_json::to_string(&x).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// The same, as text.
    fn explain_text(&self, py: Python<'_>) -> String {
        let c = &*self.inner;
        py.detach(|| c.explain().to_text())
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // The last reference closes the communicator, which may wait (for queued operations,
        // for peers; with a Python store, for the GIL): never with the GIL held.
        if Arc::strong_count(&self.inner) == 1 {
            let c = &*self.inner;
            Python::attach(|py| py.detach(|| drop(c.close())));
        }
    }
}

/// A queued operation.
#[pyclass(module = "oxccl._oxccl")]
struct Work {
    work: Mutex<Option<oxccl::Work<()>>>,
    /// The result once known.
    done: Mutex<Option<Result<(), Error>>>,
    /// The objects owning the buffers, until the operation completed.
    keep: Mutex<Option<Py<PyAny>>>,
    comm: Arc<Communicator>,
}

impl Work {
    fn new(w: oxccl::Work<()>, keep: Py<PyAny>, comm: Arc<Communicator>) -> Work {
        Work { work: Mutex::new(Some(w)), done: Mutex::new(None), keep: Mutex::new(Some(keep)), comm }
    }

    /// Waits up to `slice`; true once the operation completed (its result kept).
    fn poll(&self, slice: Duration) -> bool {
        let mut w = self.work.lock().unwrap_or_else(|e| e.into_inner());
        let Some(work) = w.take() else { return true };
        match work.wait_timeout(slice) {
            Ok(r) => {
                *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                true
            }
            Err(work) => {
                *w = Some(work);
                false
            }
        }
    }

    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        drop(self.keep.lock().unwrap_or_else(|e| e.into_inner()).take());
        match &*self.done.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(())) | None => Ok(()),
            Some(Err(e)) => Err(to_py(py, e.duplicate())),
        }
    }
}

#[pymethods]
impl Work {
    /// Waits for the operation (at most `timeout` seconds when given); True when it
    /// completed, False when `timeout` passed first. Raises the operation's error. Ctrl-C
    /// aborts the communicator and raises `KeyboardInterrupt`.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let limit = timeout.map(seconds).transpose()?;
        let start = std::time::Instant::now();
        // Ctrl-C aborts the communicator of a waiting Work on any thread (off the main thread
        // Python cannot raise there; the wait then ends with AbortedError).
        let _busy = interrupt::Busy::enter(&self.comm);
        loop {
            let slice = match limit {
                Some(l) => l.saturating_sub(start.elapsed()).min(Duration::from_millis(100)),
                None => Duration::from_millis(100),
            };
            if py.detach(|| self.poll(slice)) {
                return self.finish(py).map(|_| true);
            }
            if let Err(interrupted) = py.check_signals() {
                // Never leave the operation writing into buffers Python may free: abort, and
                // wait for the abort to end it.
                self.comm.abort();
                py.detach(|| while !self.poll(Duration::from_millis(100)) {});
                let _ = self.finish(py);
                return Err(interrupted);
            }
            if limit.is_some_and(|l| start.elapsed() >= l) {
                return Ok(false);
            }
        }
    }

    /// True once the operation completed (never blocks; raises its error then).
    fn test(&self, py: Python<'_>) -> PyResult<bool> {
        if self.poll(Duration::ZERO) {
            self.finish(py)?;
            return Ok(true);
        }
        Ok(false)
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // Still running: the buffers' objects must outlive it. A thread waits for it, then
        // lets them go (with the interpreter attached).
        let work = self.work.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        let keep = self.keep.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let (Some(work), Some(keep)) = (work, keep) {
            std::thread::spawn(move || {
                let _ = work.wait();
                // At interpreter exit the closure is dropped unrun, and `keep` with it
                // (PyO3 then defers the reference count change; nothing waits).
                let _ = Python::try_attach(|_| drop(keep));
            });
        }
    }
}

/// Logs to stderr as the `oxccl` command does, filtered by `OXCCL_LOG` (default `warn`).
fn init_logging() {
    let filter = std::env::var("OXCCL_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// The data pointer of a numpy array: the first field after the object header of numpy's
/// `PyArrayObject_fields` (what numpy's own `PyArray_DATA` reads; the layout is part of
/// numpy's C ABI, 1.x and 2.x). About 0.1 us, against 1 us for `__array_interface__`.
/// The caller (oxccl/_buffers.py) passes only instances of `numpy.ndarray`.
#[pyfunction]
fn ndarray_data(py: Python<'_>, arr: &Bound<'_, PyAny>) -> PyResult<usize> {
    static NDARRAY: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    let ndarray = NDARRAY.import(py, "numpy", "ndarray")?;
    if !arr.is_instance(ndarray)? {
        return Err(PyValueError::new_err("ndarray_data takes a numpy.ndarray"));
    }
    // SAFETY: `arr` is a live numpy array (checked above); its struct starts with the
    // object header (two words in every non-debug, GIL-ful CPython an abi3 module loads
    // into), then `char *data`.
    let data = unsafe {
        let head = arr.as_ptr().cast::<u8>().add(2 * std::mem::size_of::<usize>());
        *head.cast::<*mut u8>()
    };
    Ok(data.expose_provenance())
}

/// Every data type name the native module accepts, with its size in bytes.
#[pyfunction]
fn dtypes() -> Vec<(&'static str, usize)> {
    DataType::ALL.iter().map(|d| (d.name(), d.size())).collect()
}

/// The version of the Rust library.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _oxccl(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    m.add_class::<Comm>()?;
    m.add_class::<Work>()?;
    m.add_function(wrap_pyfunction!(dtypes, m)?)?;
    m.add_function(wrap_pyfunction!(ndarray_data, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(pystore::_interpreter_exiting, m)?)?;
    // Before the interpreter tears down, OxCCL's own threads stop using Python stores.
    let hook = m.getattr("_interpreter_exiting")?;
    m.py().import("atexit")?.call_method1("register", (hook,))?;
    Ok(())
}
