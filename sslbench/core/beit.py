"""BEiT-family timm models (``timm.models.beit.Beit``: ``beit_*``, ``beitv2_*``) inside sslbench's Backbone.

What differs from a plain timm ViT is the attention: a learned *relative position bias* (Bao et al. 2022, after
Swin) added to the attention logits, looked up per pair of tokens in a table of (2·Wh−1)(2·Ww−1) relative offsets
plus three entries for CLS→patch, patch→CLS and CLS→CLS. The table is either one module shared by every block
(``use_shared_rel_pos_bias``: BEiT pre-training, ConMIM) or one per block (``use_rel_pos_bias``: BEiT fine-tuning,
timm's ``beit_*`` defaults), or both (their sum). Blocks may also carry layer scale (``init_values`` → ``gamma_1``,
``gamma_2``) and the attention has q and v biases but no k bias.

timm's attention builds its bias for the whole window, so a sequence that holds only some patches (a
:class:`~sslbench.core.masks.DropMask` or :class:`~sslbench.core.masks.SplitMask`) would get the bias of the *first*
K positions. Here the bias is looked up from each token's true grid position (:func:`relative_index`), and
:func:`block_forward` runs a timm BEiT block with that bias, using the block's own parameters (the module tree and
the state-dict keys stay timm's). Views of a grid *smaller* than the table's window (multi-crop local crops) get the
exact bias of their relative offsets, which the table already holds; a larger grid is refused (it would need
offsets the table never learned).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.core.errors import RecipeError, UserError

#: ``[backbone] model_args`` keys that sslbench sets itself or that have their own recipe key
RESERVED_ARGS = {
    "img_size": "backbone.img_size", "patch_size": "backbone.patch_size", "in_chans": "backbone.in_chans",
    "embed_dim": "backbone.embed_dim", "depth": "backbone.depth", "num_heads": "backbone.num_heads",
    "num_classes": "sslbench builds a feature extractor (no head)",
    "global_pool": "sslbench normalises every token with the final norm and pools in the evaluators",
    "fc_norm": "sslbench normalises every token with the final norm and pools in the evaluators",
    "use_fc_norm": "sslbench normalises every token with the final norm and pools in the evaluators",
    "class_token": "sslbench needs a class token", "pre_norm": "backbone.checkpoint_format",
    "final_norm": "backbone.checkpoint_format", "no_embed_class": "backbone.checkpoint_format",
    "pretrained": "backbone.checkpoint", "pretrained_cfg": "backbone.checkpoint",
    "device": "the run's device", "dtype": "the run's precision",
}


def is_beit(vit: nn.Module) -> bool:
    """True for a timm ``Beit`` (imported lazily: timm pulls in torchvision)."""
    from timm.models.beit import Beit

    return isinstance(vit, Beit)


def rel_pos_bias_kind(vit: nn.Module) -> str:
    """``"shared"``, ``"per_block"``, ``"shared+per_block"`` or ``"none"``."""
    shared = vit.rel_pos_bias is not None
    per_block = vit.blocks[0].attn.relative_position_bias_table is not None
    return {(True, False): "shared", (False, True): "per_block", (True, True): "shared+per_block",
            (False, False): "none"}[(shared, per_block)]


def architecture(vit: nn.Module) -> dict[str, Any]:
    """The BEiT build options that change the math (besides sizes), for :attr:`Backbone.architecture`."""
    return {"rel_pos_bias": rel_pos_bias_kind(vit), "layer_scale": vit.blocks[0].gamma_1 is not None,
            "abs_pos_embed": vit.pos_embed is not None}


def check_model_args(model: str, constructor: Any, args: dict[str, Any]) -> None:
    """Refuse ``[backbone] model_args`` the constructor does not take, or that sslbench decides, in one line each.

    Only arguments with plain defaults (numbers, booleans, strings, None) are passed through: a TOML value cannot
    name a layer class.
    """
    import inspect

    params = inspect.signature(constructor).parameters
    for key, value in args.items():
        where = f"backbone.model_args.{key}"
        if key in RESERVED_ARGS:
            raise RecipeError(where, f"not settable here ({RESERVED_ARGS[key]})")
        if key not in params or key in ("self", "args", "kwargs"):
            plain = sorted(k for k, p in params.items() if k not in RESERVED_ARGS and k != "self"
                           and p.kind is p.POSITIONAL_OR_KEYWORD
                           and (p.default is None or isinstance(p.default, (bool, int, float, str))))
            name = getattr(constructor, "__name__", type(constructor).__name__)
            raise RecipeError(where, f"{name} (model {model!r}) takes no argument {key!r}; it takes "
                            f"{', '.join(plain)}")
        default = params[key].default
        if value is None and default is None:
            continue
        if default is not None and not isinstance(default, (bool, int, float, str)):
            raise RecipeError(where, f"a {type(default).__name__} argument cannot be set from a recipe")
        # the expected type: the default's, or the annotation's for a None default (``Optional[float]``)
        hint = str(params[key].annotation)
        wants_bool = isinstance(default, bool) or (default is None and "bool" in hint)
        wants_number = (isinstance(default, (int, float)) and not isinstance(default, bool)) or (
            default is None and ("float" in hint or "int" in hint) and "str" not in hint)
        if wants_bool and not isinstance(value, bool):
            raise RecipeError(where, f"expected true or false, got {value!r}")
        if wants_number and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RecipeError(where, f"expected a number, got {value!r}")
        if not isinstance(value, (bool, int, float, str)):
            raise RecipeError(where, f"expected a number, boolean or string, got {value!r}")


def relative_index(window: tuple[int, int], positions: Tensor, grid: tuple[int, int], cls: bool = True) -> Tensor:
    """Indices into a BEiT bias table for the tokens at ``positions``: (..., L, L), L = K + 1 with CLS first.

    ``positions`` (..., K) are patch indices in row-major order on a ``grid`` (rows, cols); ``window`` is the grid
    the table was built for. The patch-pair index is timm's (``gen_relative_position_index``):
    ``(Δrow + Wh − 1)·(2·Ww − 1) + (Δcol + Ww − 1)``; CLS rows and columns take the last three table entries
    (query CLS → any key: n−3, patch query → CLS key: n−2, CLS → CLS: n−1). ``cls=False``: patches only, (..., K, K).
    """
    window_h, window_w = window
    grid_h, grid_w = grid
    if grid_h > window_h or grid_w > window_w:
        raise UserError(f"a {grid_h}x{grid_w}-patch view is larger than the {window_h}x{window_w} window of the "
                        f"BEiT relative position bias; views may be at most the backbone's img_size")
    rows, cols = positions // grid_w, positions % grid_w
    pairs = ((rows.unsqueeze(-1) - rows.unsqueeze(-2) + window_h - 1) * (2 * window_w - 1)
             + cols.unsqueeze(-1) - cols.unsqueeze(-2) + window_w - 1)
    if not cls:
        return pairs
    count = (2 * window_h - 1) * (2 * window_w - 1) + 3
    k = positions.shape[-1]
    index = pairs.new_full(positions.shape[:-1] + (k + 1, k + 1), count - 1)
    index[..., 1:, 1:] = pairs
    index[..., 0, 1:] = count - 3
    index[..., 1:, 0] = count - 2
    return index


def lookup(table: Tensor, index: Tensor) -> Tensor:
    """The (..., H, L, L) bias of a (entries, H) table at a (..., L, L) index (a leading 1 for a shared index)."""
    bias = table[index].movedim(-1, -3)
    return bias if bias.ndim == 4 else bias.unsqueeze(0)


class TokenBias:
    """The relative position bias of one forward: the tokens' table indices (computed once, shared by every block)
    and the shared table's bias. ``positions`` (B, K) or None for the full ``grid`` in patch order."""

    def __init__(self, vit: nn.Module, positions: Tensor | None, grid: tuple[int, int], cls: bool, device):
        self.indices: dict[tuple[int, int], Tensor] = {}
        if positions is None:
            positions = torch.arange(grid[0] * grid[1], device=device)
        self.positions, self.grid, self.cls = positions, tuple(grid), cls
        shared = vit.rel_pos_bias
        self.shared = (lookup(shared.relative_position_bias_table, self.index(tuple(shared.window_size)))
                       if shared is not None else None)

    def index(self, window: tuple[int, int]) -> Tensor:
        if window not in self.indices:
            self.indices[window] = relative_index(window, self.positions, self.grid, self.cls)
        return self.indices[window]

    def block_index(self, block: nn.Module) -> Tensor | None:
        """The index for ``block``'s own table, or None when it has none."""
        attn = block.attn
        return None if attn.relative_position_bias_table is None else self.index(tuple(attn.window_size))


def block_forward(block: nn.Module, x: Tensor, index: Tensor | None, shared: Tensor | None) -> Tensor:
    """timm's ``beit.Block`` forward with the bias of the given tokens: ``block``'s own table at ``index`` (if it
    has one) plus the ``shared`` bias (B or 1, H, L, L). Written against the block's parameters — ``norm1``,
    ``attn.qkv`` with ``q_bias``/``v_bias`` (k has none), ``attn.proj``, ``gamma_1``/``gamma_2``, ``norm2``,
    ``mlp`` — so that a state dict is exactly timm's; dropout and drop-path as timm applies them."""
    attn = block.attn
    batch, length, _ = x.shape
    h = block.norm1(x)
    qkv_bias = None
    if attn.q_bias is not None:
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
    qkv = F.linear(h, attn.qkv.weight, qkv_bias).reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = shared
    if index is not None:
        own = lookup(attn.relative_position_bias_table, index)
        bias = own if bias is None else bias + own
    # SDPA adds a float mask to the logits; it must be in the logits' dtype (bf16 under autocast)
    h = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                       dropout_p=attn.attn_drop.p if block.training else 0.0, scale=attn.scale)
    h = attn.proj_drop(attn.proj(h.transpose(1, 2).reshape(batch, length, -1)))
    if block.gamma_1 is not None:
        x = x + block.drop_path1(block.gamma_1 * h)
        return x + block.drop_path2(block.gamma_2 * block.mlp(block.norm2(x)))
    x = x + block.drop_path1(h)
    return x + block.drop_path2(block.mlp(block.norm2(x)))
