# Type stubs of the native module (python/src/lib.rs). Buffers are (address, element count,
# data type name) tuples made by oxccl._buffers, with the GPU's index for a CUDA tensor.

from typing import Any, List, Optional, Tuple, Union

from typing_extensions import TypeAlias, final

__all__ = ["Comm", "Work", "dtypes", "ndarray_data", "version", "_interpreter_exiting"]

_Buf: TypeAlias = Union[Tuple[int, int, str], Tuple[int, int, str, int]]

@final
class Comm:
    @staticmethod
    def from_env() -> Comm: ...
    @staticmethod
    def create(
        rank: int,
        world_size: int,
        store: str,
        store_hosted: bool = ...,
        timeout: Optional[float] = ...,
    ) -> Comm: ...
    @staticmethod
    def from_store(
        store: Any,
        rank: int,
        world_size: int,
        timeout: Optional[float] = ...,
        traffic_class: Optional[str] = ...,
    ) -> Comm: ...
    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def timeout(self) -> float: ...
    def set_timeout(self, seconds_: float) -> None: ...
    @property
    def traffic_class(self) -> str: ...
    @property
    def aborted(self) -> bool: ...
    def call(
        self,
        name: str,
        send: _Buf,
        recv: _Buf,
        reduce: Optional[str] = ...,
        root: int = ...,
        counts: Optional[Tuple[List[int], List[int]]] = ...,
        timeout: Optional[float] = ...,
        roots: Optional[List[int]] = ...,
    ) -> None: ...
    def submit(
        self,
        name: str,
        send: _Buf,
        recv: _Buf,
        keep: Any,
        reduce: Optional[str] = ...,
        root: int = ...,
        counts: Optional[Tuple[List[int], List[int]]] = ...,
        roots: Optional[List[int]] = ...,
    ) -> Work: ...
    def submit_on_stream(
        self,
        name: str,
        send: _Buf,
        recv: _Buf,
        keep: Any,
        stream: int,
        reduce: Optional[str] = ...,
        root: int = ...,
        counts: Optional[Tuple[List[int], List[int]]] = ...,
        roots: Optional[List[int]] = ...,
    ) -> Work: ...
    def p2p_on_stream(self, send: bool, buf: _Buf, peer: int, keep: Any, stream: int) -> Work: ...
    def all_to_all_v_dynamic(
        self,
        send: _Buf,
        send_counts: List[int],
        recv: _Buf,
        timeout: Optional[float] = ...,
    ) -> List[int]: ...
    def p2p(
        self, send: bool, buf: _Buf, peer: int, timeout: Optional[float] = ..., tag: int = ...
    ) -> None: ...
    def p2p_async(self, send: bool, buf: _Buf, peer: int, keep: Any, tag: int = ...) -> Work: ...
    def group(self, ops: List[Tuple[bool, _Buf, int]], timeout: Optional[float] = ...) -> None: ...
    def split(
        self, color: Optional[int], key: int, traffic_class: Optional[str] = ...
    ) -> Optional[Comm]: ...
    def shrink(self, excluded: List[int]) -> Comm: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
    def explain_json(self) -> str: ...
    def explain_text(self) -> str: ...

@final
class Work:
    def wait(self, timeout: Optional[float] = ...) -> bool: ...
    def test(self) -> bool: ...

def dtypes() -> List[Tuple[str, int]]: ...
def ndarray_data(arr: Any) -> int: ...
def version() -> str: ...
def _interpreter_exiting() -> None: ...
