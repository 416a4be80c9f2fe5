"""Execute the tutorial notebooks: in smoke mode (CI) or in full, writing their outputs back.

    python tutorials/execute.py              # all notebooks, PYROFLOWS_SMOKE=1, outputs discarded
    python tutorials/execute.py --full       # all notebooks in full; outputs saved in place
    python tutorials/execute.py reverse_kl.ipynb --full --timeout 3600

Each notebook runs in a fresh kernel (always the Python running this script, through ipykernel) with
``tutorials/`` as its working directory, so the data sets under ``../shared/data`` (or
``$PYROFLOWS_DATA``) are found the same way as when a reader opens it in Jupyter. Smoke mode sets
``PYROFLOWS_SMOKE=1``, which every notebook reads to run in seconds (few steps, small data); the
executed copy is thrown away. A failing cell stops that notebook with its traceback and makes the
script exit non-zero after the others have run. Needs the ``docs`` extra (nbclient, ipykernel).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _this_python_kernel(sockets: str):
    """A kernel manager that always starts ipykernel in the Python running this script.

    A ``python3`` kernelspec installed elsewhere (``jupyter kernelspec list``) could point at
    another environment, where another pyroflows (or none) is installed.
    """
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import KernelManager

    class ThisPython(KernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            if os.name == "posix":  # local sockets: the kernel's plain-TCP warning stays away
                self.transport = "ipc"
                self.ip = str(Path(sockets) / "kernel")

        @property
        def kernel_spec(self) -> KernelSpec:
            argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
            return KernelSpec(argv=argv, display_name="Python 3", language="python")

    return ThisPython


def execute(path: Path, *, full: bool, timeout: int) -> float:
    """Run one notebook top to bottom; return the seconds it took. Raises on a failing cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if full:
        os.environ.pop("PYROFLOWS_SMOKE", None)
    else:
        os.environ["PYROFLOWS_SMOKE"] = "1"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pyroflows-kernel-") as sockets:
        client.kernel_manager_class = _this_python_kernel(sockets)
        client.execute()
    seconds = time.perf_counter() - start
    if full:
        nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: all here)")
    parser.add_argument("--full", action="store_true", help="run in full and save the outputs")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = [Path(n) if Path(n).exists() else HERE / n for n in args.notebooks]
    paths = paths or sorted(HERE.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        parser.error(f"expected notebook files; not found: {', '.join(missing)}")
    timeout = args.timeout or (7200 if args.full else 600)
    mode = "full" if args.full else "smoke"
    failed = []
    total = time.perf_counter()
    for path in paths:
        try:
            seconds = execute(path.resolve(), full=args.full, timeout=timeout)
        except Exception as error:  # report every notebook, then fail
            failed.append(path.name)
            print(f"FAILED {path.name} ({mode}): {type(error).__name__}: {error}", flush=True)
        else:
            print(f"ok     {path.name} ({mode}) in {seconds:.1f} s", flush=True)
    print(
        f"{len(paths) - len(failed)}/{len(paths)} notebooks ran in "
        f"{time.perf_counter() - total:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
