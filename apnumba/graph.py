"""Capture a sequence of launches on a stream into a CUDA graph, and replay it with one call.

numba-cuda has no graph API; the driver's stream capture works on numba's streams:
everything launched on ``stream`` between ``begin`` and ``end`` (kernels,
async memsets) becomes one graph, replayed by :meth:`CudaGraph.replay` with a
single driver call - the Python cost of a replay is one launch, not one per kernel.
"""

from numba import cuda


class CudaGraph:
    """``with CudaGraph(stream) as g: ...launches on stream...`` then ``g.replay()``."""

    def __init__(self, stream):
        if not stream or int(stream.handle or 0) == 0:
            raise ValueError("stream: capture needs a stream of its own (cuda.stream()), not the default stream")
        self.stream = stream
        self._exec = None
        self._graph = None

    def __enter__(self):
        from cuda.bindings import driver as drv

        mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        _check(drv.cuStreamBeginCapture(int(self.stream.handle), mode), "cuStreamBeginCapture")
        return self

    def __exit__(self, exc_type, exc, tb):
        from cuda.bindings import driver as drv

        err, graph = drv.cuStreamEndCapture(int(self.stream.handle))
        if exc_type is not None:
            return False
        _check((err,), "cuStreamEndCapture")
        self._graph = graph
        err, self._exec = drv.cuGraphInstantiate(graph, 0)
        _check((err,), "cuGraphInstantiate")
        return False

    def replay(self):
        """Launch the whole graph on the stream (asynchronous)."""
        from cuda.bindings import driver as drv

        _check(drv.cuGraphLaunch(self._exec, int(self.stream.handle)), "cuGraphLaunch")

    def __del__(self):
        try:
            from cuda.bindings import driver as drv

            if self._exec is not None:
                drv.cuGraphExecDestroy(self._exec)
            if self._graph is not None:
                drv.cuGraphDestroy(self._graph)
        except Exception:
            pass


def _check(result, what):
    from cuda.bindings import driver as drv

    err = result[0]
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")


def gpu_time_per_call(stream, fn, calls=100, replays=5):
    """Median GPU microseconds per ``fn()`` call: ``calls`` calls captured in a graph, replayed and timed by events."""
    import numpy as np

    fn()  # compile, allocate, warm
    stream.synchronize()
    with CudaGraph(stream) as graph:
        for _ in range(calls):
            fn()
    graph.replay()
    stream.synchronize()
    times = []
    for _ in range(replays):
        start, stop = cuda.event(), cuda.event()
        start.record(stream)
        graph.replay()
        stop.record(stream)
        stop.synchronize()
        times.append(1e3 * cuda.event_elapsed_time(start, stop) / calls)
    return float(np.median(times))
