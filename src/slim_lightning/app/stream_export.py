"""The exports of a streaming run, one decoder block at a time (``engine.streaming``).

A streaming run's compressed blocks wait in ``RUN/offloaded`` (``compress.streaming``); the
exports open them one after another instead of reading the whole packed model back:

* ``offloaded_blocks``: the ``checkpoint.stream_save.OffloadedBlocks`` view of a
  ``StreamingSource`` (block ``i``'s offload file, read a layer or a tensor at a time, or the
  block read back from it and evicted again);
* the packed checkpoint: ``checkpoint.stream_save.save_streaming`` (sharded; one layer in
  memory at a time, ``checkpoint.stream_save``);
* ``write_hf_streaming``: the plain Hugging Face model (``export.hf``), one block in memory at
  a time: its compressed layers merged into dense ``nn.Linear`` weights and written to a shard
  of its own (sharded safetensors + index, ``config.json``, ``generation_config.json``,
  tokenizer: what ``save_pretrained`` writes from the whole merged model, the same tensors);
* ``offloaded_metas``: the offloaded layers' metadata, for the size estimate
  (``checkpoint.layout.linear_sizes``).

The servable export needs the whole model (one group size chosen over every layer) and is
refused with streaming before anything loads (``app.autostream.resolve_streaming``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint.stream_save import BlockTensors, FileBlock, ModuleBlock, OffloadedBlocks
from ..io import atomic_dir


def offloaded_blocks(stream: Any) -> OffloadedBlocks:
    """The blocks of ``stream`` (a ``StreamingSource``) as the exports stream them: the packed
    writer reads each layer from the block's offload file, the ``hf/`` writer opens the block."""

    def tensors(i: int) -> BlockTensors:
        if i in stream.offloaded_layers:
            return FileBlock(stream.offload_file(i), stream.offloaded_layers[i])
        return ModuleBlock(stream.blocks[i])  # (not offloaded: in memory)

    return OffloadedBlocks(stream.arch.blocks_path, len(stream.blocks), stream.opened, tensors)


def offloaded_metas(stream: Any) -> dict[str, dict]:
    """``{full layer name: SLiMLinear.meta()}`` of every compressed layer waiting on disk."""
    path = stream.arch.blocks_path
    return {
        f"{path}.{i}.{n}": meta
        for i, metas in sorted(stream.offloaded_layers.items())
        for n, meta in metas.items()
    }


def write_hf_streaming(
    model: nn.Module,
    blocks: OffloadedBlocks,
    tokenizer: Any,
    out: Path,
    *,
    packed: bool,
    requantize: bool,
) -> None:
    """``export.write_hf`` of a model whose blocks wait on disk, one block in memory at a time.

    Shard 1 holds everything outside the blocks, shard ``i + 2`` block ``i``.

    Args:
        model: the skeleton (vocabulary tables, final norm and LM head in memory).
        blocks: its decoder blocks.
        tokenizer: saved alongside.
        out: the target directory (written atomically).
        packed: the layers are ``SLiMLinear`` (merged into dense weights, as ``write_hf``).
        requantize: off-grid adapters are re-quantised before merging (what the packed export,
            when it ran first, did to the whole model).
    """
    from ..checkpoint.shards_out import ShardedWriter
    from ..nn.adapters import merge_to_dense
    from ..nn.linear import SLiMLinear

    prefix = blocks.path + "."
    if packed:
        merge_to_dense(model)  # the resident part (the skeleton's blocks hold meta linears)
    # what save_pretrained records before it writes the config
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    with atomic_dir(out) as tmp:
        model.config.save_pretrained(tmp)
        if model.can_generate():
            model.generation_config.save_pretrained(tmp)
        writer = ShardedWriter(tmp, blocks.count + 1, {"format": "pt"}, out.name)
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
        writer.write(1, _as_saved(model, sd))
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(prefix))
        del sd
        for i in range(blocks.count):
            with blocks.open(i) as block:
                for name, m in list(block.named_modules()):
                    if isinstance(m, SLiMLinear):
                        if requantize and not m.adapters_on_grid():
                            m.requantize_adapters()
                        block.set_submodule(name, m.to_linear())
                full = blocks.name(i)
                sd = {f"{full}.{k}": v for k, v in block.state_dict().items()}
                writer.write(i + 2, _as_saved(model, sd))
                params += sum(p.numel() for p in block.parameters())
                del sd
        writer.finish(total_parameters=params)
        tokenizer.save_pretrained(tmp)


def _as_saved(model: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    """Part of a state dict as ``save_pretrained`` writes it: ignored keys and tied aliases
    dropped, transformers' weight renamings reverted, contiguous."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        sd.pop(key, None)
    sd = remove_tied_weights_from_state_dict(sd, model)
    sd = revert_weight_conversion(model, sd)
    return {k: v.detach().contiguous() for k, v in sd.items()}
