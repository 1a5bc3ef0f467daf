//! A rendezvous store that is a Python object: torch's c10d store (`TCPStore`,
//! `PrefixStore`, ...), which torch hands a backend, so OxCCL meets its peers through it and
//! opens no port of its own. Each call attaches to the interpreter (c10d's store methods
//! release the GIL while they wait on the network).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use oxccl::{Error, Result, Store};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

/// A c10d-like store: `set(key, bytes)`, `get(key) -> bytes`, `add(key, int) -> int`,
/// `check([keys]) -> bool`, `wait([keys], timedelta)`, `delete_key(key) -> bool`.
pub(crate) struct PyStore {
    obj: Py<PyAny>,
}

impl std::fmt::Debug for PyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PyStore")
    }
}

impl PyStore {
    pub(crate) fn new(obj: Py<PyAny>) -> PyStore {
        PyStore { obj }
    }
}

/// Set by an `atexit` hook: the interpreter is going away. A thread of OxCCL's own (the
/// diagnosis answerer of a communicator nobody closed) that touched the store after that
/// crashed the process at exit, attaching to an interpreter already torn down.
static INTERPRETER_EXITING: AtomicBool = AtomicBool::new(false);

/// What the `atexit` hook calls (registered when the module loads).
#[pyfunction]
pub(crate) fn _interpreter_exiting() {
    INTERPRETER_EXITING.store(true, Ordering::SeqCst);
}

/// Runs `f` attached to the interpreter, unless it is exiting (then the store is gone).
fn attach<R>(f: impl for<'py> FnOnce(Python<'py>) -> Result<R>) -> Result<R> {
    // SAFETY: Py_IsInitialized may be called at any time, with or without the GIL.
    if INTERPRETER_EXITING.load(Ordering::SeqCst) || unsafe { pyo3::ffi::Py_IsInitialized() } == 0 {
        return Err(Error::Store("the Python store is gone: the interpreter is exiting".into()));
    }
    Python::attach(f)
}

fn store_err(what: &str, key: &str, e: PyErr) -> Error {
    Error::Store(format!("the Python store's {what}({key:?}) failed: {e}"))
}

fn timedelta(py: Python<'_>, d: Duration) -> PyResult<Bound<'_, PyAny>> {
    py.import("datetime")?.getattr("timedelta")?.call1((0, d.as_secs_f64().min(86400.0 * 365.0)))
}

impl Store for PyStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        attach(|py| {
            self.obj
                .call_method1(py, "set", (key, PyBytes::new(py, value)))
                .map(|_| ())
                .map_err(|e| store_err("set", key, e))
        })
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        attach(|py| {
            let keys = PyList::new(py, [key]).map_err(|e| store_err("check", key, e))?;
            let there = self
                .obj
                .call_method1(py, "check", (keys,))
                .and_then(|v| v.extract::<bool>(py))
                .map_err(|e| store_err("check", key, e))?;
            if !there {
                return Ok(None);
            }
            let v = self.obj.call_method1(py, "get", (key,)).map_err(|e| store_err("get", key, e))?;
            v.extract::<Vec<u8>>(py).map(Some).map_err(|e| store_err("get", key, e))
        })
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.wait(&[key.to_string()], timeout)?;
        attach(|py| {
            let v = self.obj.call_method1(py, "get", (key,)).map_err(|e| store_err("get", key, e))?;
            v.extract::<Vec<u8>>(py).map_err(|e| store_err("get", key, e))
        })
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        attach(|py| {
            self.obj
                .call_method1(py, "add", (key, delta))
                .and_then(|v| v.extract::<i64>(py))
                .map_err(|e| store_err("add", key, e))
        })
    }

    fn delete(&self, key: &str) -> Result<bool> {
        attach(|py| {
            self.obj
                .call_method1(py, "delete_key", (key,))
                .and_then(|v| v.extract::<bool>(py))
                .map_err(|e| store_err("delete_key", key, e))
        })
    }

    fn wait(&self, keys: &[String], timeout: Duration) -> Result<()> {
        attach(|py| {
            let list = PyList::new(py, keys).map_err(|e| store_err("wait", &keys.join(","), e))?;
            let td = timedelta(py, timeout).map_err(|e| store_err("wait", &keys.join(","), e))?;
            match self.obj.call_method1(py, "wait", (list, td)) {
                Ok(_) => Ok(()),
                // c10d raises a timeout as DistStoreError/RuntimeError with "timeout" in it.
                Err(e) if e.to_string().to_lowercase().contains("timeout") => {
                    Err(oxccl_core::store::timeout_error(&keys.join(", "), timeout))
                }
                Err(e) => Err(store_err("wait", &keys.join(","), e)),
            }
        })
    }
}
