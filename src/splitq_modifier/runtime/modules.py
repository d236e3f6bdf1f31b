"""Runtime modules of a SplitQ model: what a quantized model holds after ``oneshot`` and after
loading a ``splitq-packed`` checkpoint. Nothing here needs llm-compressor or calibration code.

- :class:`ModalityContext` and :func:`attach_modality_context`: which tokens of the running
  batch are text (the MAC branch applies to text rows only), from the ``input_ids`` seen by
  the input embedding.
- :class:`SplitQSiteLinear`: one linear of an activation site. The site's *owner* (its first
  linear, e.g. ``q_proj``) stores every tensor of the site: the channel permutation,
  smoothing, Kronecker factors, activation clipping, the packed weights of all the site's
  linears concatenated along the output dim (as vLLM's fused qkv / gate-up layers), their
  branches and biases. When the owner runs, one ``torch.ops.splitq.site_linear`` call
  transforms and quantizes the input once and computes the outputs of all the site's
  linears; the other members (``k_proj``, ``v_proj``) return their columns of that result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from splitq_modifier.runtime.ops import site_linear
from splitq_modifier.runtime.params import (
    UNQUANTIZED,
    SiteBranchParams,
    SiteParams,
    flatten_factor_dims,
    split_factors,
)
from splitq_modifier.runtime.quant import (
    mma_weight_words,
    packed_words,
    unpack_mma_weight,
)

__all__ = [
    "ModalityContext",
    "SiteBranch",
    "SplitQSiteLinear",
    "attach_modality_context",
    "site_members",
]


class ModalityContext:
    """Which tokens of the batch being run are text, shared by the SplitQ linears of a model.

    ``text_mask`` is a bool tensor over the leading (batch, sequence) dims of the hidden
    states, or None when unknown (then every token counts as text, as at decode time).
    ``vision_ids`` are the token ids that mark vision positions (saved with the model, so a
    reloaded model marks exactly the tokens calibration did).
    """

    def __init__(self, vision_ids: tuple[int, ...] = ()) -> None:
        self.text_mask: Tensor | None = None
        self.vision_ids = tuple(int(i) for i in vision_ids)

    def mask_for(self, x: Tensor) -> Tensor | None:
        """The text mask broadcastable to ``x[..., 0]``, or None if it does not fit ``x``."""
        m = self.text_mask
        if m is None or m.shape != x.shape[:-1]:
            return None
        return m if m.device == x.device else m.to(x.device)


def attach_modality_context(
    model: nn.Module, vision_ids: list[int], context: ModalityContext
) -> None:
    """Keep ``context.text_mask`` up to date from every forward's ``input_ids``.

    A forward pre-hook on the input embedding marks non-vision tokens as text. Calls without
    ``input_ids`` (embeddings passed directly) leave no mask: every token then counts as
    text, as for tokens generated at decode time.
    """
    context.vision_ids = tuple(int(i) for i in vision_ids)
    ids = torch.tensor(context.vision_ids, dtype=torch.long)
    cache: dict[torch.device, Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and not x.is_floating_point():
            dev_ids = cache.get(x.device)
            if dev_ids is None:
                dev_ids = cache[x.device] = ids.to(x.device)
            context.text_mask = ~torch.isin(x, dev_ids)
        else:
            context.text_mask = None

    old = getattr(model, "_splitq_context_hook", None)
    if old is not None:
        old.remove()
    model._splitq_context_hook = model.get_input_embeddings().register_forward_pre_hook(hook)
    model.splitq_context = context


def _keep_fp32(module: nn.Module, fn, recurse: bool):
    keep = {n: b for n, b in module._buffers.items() if b is not None and b.is_floating_point()}
    out = nn.Module._apply(module, fn, recurse)
    for n, old in keep.items():
        new = module._buffers[n]
        if new is not None and new.dtype != old.dtype:
            module._buffers[n] = old.to(new.device)
    return out


class SiteBranch(nn.Module):
    """The CWS or MAC branch of every linear of a site (packed codes, fp32 scales).

    Buffers: ``down_packed`` int32 (R, ceil(km b / 32)) with ``R = sum(ranks)``,
    ``down_scale`` (R,), ``up_packed`` int32 (D, ceil(max(ranks) b / 32)), ``up_scale`` (D,).
    """

    def __init__(
        self,
        down_packed: Tensor,
        down_scale: Tensor,
        up_packed: Tensor,
        up_scale: Tensor,
        ranks: tuple[int, ...],
        bits: int,
        input: str = "residual",
    ):
        super().__init__()
        if input not in ("residual", "act"):
            raise ValueError(f"branch input must be 'residual' or 'act', got {input!r}")
        self.ranks = tuple(int(r) for r in ranks)
        self.bits = int(bits)
        self.input = input
        self.register_buffer("down_packed", down_packed)
        self.register_buffer("down_scale", down_scale.float().reshape(-1))
        self.register_buffer("up_packed", up_packed)
        self.register_buffer("up_scale", up_scale.float().reshape(-1))

    @staticmethod
    def tensor_shapes(
        ranks: tuple[int, ...], km: int, d_out: int, bits: int
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the buffers of a branch of these dimensions."""
        r, rmax = sum(ranks), max(ranks)
        return {
            "down_packed": ((r, packed_words(km, bits)), torch.int32),
            "down_scale": ((r,), torch.float32),
            "up_packed": ((d_out, packed_words(rmax, bits)), torch.int32),
            "up_scale": ((d_out,), torch.float32),
        }

    def params(self) -> SiteBranchParams:
        """As :class:`SiteBranchParams` (sharing the tensors)."""
        return SiteBranchParams(
            self.down_packed, self.down_scale, self.up_packed, self.up_scale, self.ranks,
            self.bits, self.bits,
        )  # fmt: skip

    def _apply(self, fn, recurse: bool = True):
        return _keep_fp32(self, fn, recurse)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, bits={self.bits}, input={self.input!r}"


class SplitQSiteLinear(nn.Module):
    """One linear of a SplitQ activation site at runtime (see the module docstring).

    Build the owner with :meth:`owner_from_tensors` and the other members with
    :meth:`member`. Attributes: ``in_features``, ``out_features``, ``index`` (position in the
    site), ``site_ref`` (attribute name of the owner in the common parent, None on the owner).

    Owner buffers (``p`` = 0, 1, 2: vision-outlier, text-outlier, main path; ``D`` = the site's
    total output width): ``perm`` int32 (d,), ``act_clip`` fp32 (3,), ``smooth`` fp32 (d,)
    in path order, ``factors`` fp32 (flat, see :mod:`.reference`), ``weight_packed_{p}`` int32
    (D, mma_weight_words(k_p, b_p)) in the MMA block packing (``quant.pack_mma_weight``),
    ``weight_scale_{p}`` fp32 (D,), ``site_bias`` fp32 (D,) or None;
    children ``cws`` / ``mac`` (:class:`SiteBranch`) or None. Tensors of an empty path or of
    a site without factors are non-persistent placeholders. ``.to(dtype)`` leaves the fp32
    tensors fp32 (the op's contract).
    """

    def __init__(self, in_features: int, out_features: int, index: int = 0):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.index = int(index)
        self.site_ref: str | None = None
        self.__dict__["_owner"] = self  # plain attribute: not a submodule
        self._memo = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def owner_from_tensors(
        cls,
        tensors: dict[str, Tensor],
        *,
        sizes: tuple[int, int, int],
        dims: tuple[tuple[int, ...], ...],
        out_splits: tuple[int, ...],
        w_bits: tuple[int, int, int],
        a_bits: tuple[int | None, int | None, int | None],
        members: tuple[str, ...],
        cws: SiteBranch | None = None,
        mac: SiteBranch | None = None,
        context: ModalityContext | None = None,
    ) -> SplitQSiteLinear:
        """The owner of a site from its tensors (local names as in the class docstring;
        placeholders of empty paths and of ``factors`` may be absent).

        :param members: attribute names of the site's linears in their parent, owner first
        :param a_bits: activation bits per path (None = not quantized: weight-only)
        """
        self = cls(sum(sizes), out_splits[0], 0)
        self.sizes = tuple(int(k) for k in sizes)
        self.dims = tuple(tuple(int(n) for n in f) for f in dims)
        self.out_splits = tuple(int(k) for k in out_splits)
        self.w_bits = tuple(int(b) for b in w_bits)
        self.a_bits = tuple(None if b is None else int(b) for b in a_bits)
        self.members = tuple(members)
        self.context = context
        if len(self.members) != len(self.out_splits):
            raise ValueError(f"{len(self.members)} member names for {len(out_splits)} outputs")
        dev = tensors["perm"].device
        big_d = sum(self.out_splits)
        self.register_buffer("perm", tensors["perm"].to(torch.int32))
        self.register_buffer("act_clip", tensors["act_clip"].float().reshape(3))
        self.register_buffer("smooth", tensors["smooth"].float().reshape(-1))
        n_f = sum(n * n for n in flatten_factor_dims(self.dims))
        factors = tensors.get("factors", torch.zeros(0, device=dev))
        self.register_buffer("factors", factors.float().reshape(-1), persistent=n_f > 0)
        for p in range(3):
            keep = self.sizes[p] > 0
            w = tensors.get(f"weight_packed_{p}")
            s = tensors.get(f"weight_scale_{p}")
            if not keep:
                w = torch.zeros(big_d, 0, dtype=torch.int32, device=dev) if w is None else w
                s = torch.ones(big_d, device=dev) if s is None else s
            self.register_buffer(f"weight_packed_{p}", w, persistent=keep)
            self.register_buffer(f"weight_scale_{p}", s.float().reshape(-1), persistent=keep)
        bias = tensors.get("site_bias")
        self.register_buffer("site_bias", None if bias is None else bias.float().reshape(-1))
        self.cws = cws
        self.mac = mac
        self.params().validate()
        return self

    @classmethod
    def from_params(
        cls,
        params: SiteParams,
        members: tuple[str, ...] | None = None,
        context: ModalityContext | None = None,
    ) -> list[SplitQSiteLinear]:
        """The owner and members of a site from :class:`SiteParams` (tests, benchmarks);
        member names default to ``linear_0, linear_1, ...``."""
        names = members or tuple(f"linear_{j}" for j in range(len(params.out_splits)))
        tensors = {"perm": params.perm, "act_clip": params.act_clip, "smooth": params.smooth,
                   "factors": params.factors}  # fmt: skip
        for p in range(3):
            tensors[f"weight_packed_{p}"] = params.w_packed[p]
            tensors[f"weight_scale_{p}"] = params.w_scale[p]
        if params.bias is not None:
            tensors["site_bias"] = params.bias

        def branch(b: SiteBranchParams | None, kind: str) -> SiteBranch | None:
            if b is None:
                return None
            return SiteBranch(b.down, b.down_scale, b.up, b.up_scale, b.ranks, b.w_bits, kind)

        owner = cls.owner_from_tensors(
            tensors,
            sizes=params.sizes,
            dims=params.dims,
            out_splits=params.out_splits,
            w_bits=params.w_bits,
            a_bits=tuple(None if b >= UNQUANTIZED else b for b in params.a_bits),
            members=names,
            cws=branch(params.cws, "residual"),
            mac=branch(params.mac, "residual" if params.mac_input == 0 else "act"),
            context=context,
        )
        return [owner] + [cls.member(owner, j, names[0]) for j in range(1, len(names))]

    @classmethod
    def member(cls, owner: SplitQSiteLinear, index: int, name: str) -> SplitQSiteLinear:
        """Member ``index`` (> 0) of ``owner``'s site; ``name`` is the owner's attribute name."""
        if not 0 < index < len(owner.out_splits):
            raise ValueError(f"site of {len(owner.out_splits)} linears has no member {index}")
        self = cls(owner.in_features, owner.out_splits[index], index)
        self.__dict__["_owner"] = owner
        self.site_ref = name
        return self

    @staticmethod
    def tensor_shapes(
        sizes: tuple[int, int, int],
        dims: tuple[tuple[int, ...], ...],
        out_splits: tuple[int, ...],
        w_bits: tuple[int, int, int],
        bias: bool,
        dense_paths: bool = False,
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Local name -> (shape, dtype) of the owner's persistent buffers (no branches);
        ``dense_paths``: the path weights in the dense packing (format version 2) instead of
        the MMA block packing."""
        d, big_d = int(sum(sizes)), int(sum(out_splits))
        out = {
            "perm": ((d,), torch.int32),
            "act_clip": ((3,), torch.float32),
            "smooth": ((d,), torch.float32),
        }
        n_f = sum(n * n for n in flatten_factor_dims(dims))
        if n_f:
            out["factors"] = ((n_f,), torch.float32)
        for p, k in enumerate(sizes):
            if int(k):
                words = (packed_words if dense_paths else mma_weight_words)(int(k), int(w_bits[p]))
                out[f"weight_packed_{p}"] = ((big_d, words), torch.int32)
                out[f"weight_scale_{p}"] = ((big_d,), torch.float32)
        if bias:
            out["site_bias"] = ((big_d,), torch.float32)
        return out

    # ------------------------------------------------------------------ accessors
    @property
    def owner(self) -> SplitQSiteLinear:
        """The linear that stores the site's tensors (itself for the owner)."""
        return self.__dict__["_owner"]

    @property
    def is_owner(self) -> bool:
        """Whether this linear stores the site's tensors."""
        return self.owner is self

    def offset(self) -> int:
        """First output column of this linear in the site's concatenated output."""
        return int(sum(self.owner.out_splits[: self.index]))

    def params(self) -> SiteParams:
        """The site's tensors as :class:`SiteParams` (sharing the tensors)."""
        o = self.owner
        return SiteParams(
            sizes=o.sizes,
            dims=o.dims,
            out_splits=o.out_splits,
            perm=o.perm,
            smooth=o.smooth,
            factors=o.factors,
            act_clip=o.act_clip,
            w_packed=tuple(getattr(o, f"weight_packed_{p}") for p in range(3)),
            w_scale=tuple(getattr(o, f"weight_scale_{p}") for p in range(3)),
            w_bits=o.w_bits,
            a_bits=tuple(UNQUANTIZED if b is None else b for b in o.a_bits),
            cws=None if o.cws is None else o.cws.params(),
            mac=None if o.mac is None else o.mac.params(),
            mac_input=0 if o.mac is None or o.mac.input == "residual" else 1,
            bias=o.site_bias,
        )

    def factor_mats(self) -> list[list[Tensor]]:
        """The Kronecker factors of each path, as square matrices (views)."""
        o = self.owner
        return split_factors(o.factors, o.dims)

    def weight_int(self, p: int) -> Tensor:
        """Unpacked int8 codes of path ``p`` for this linear's rows (``d_out x k_p``)."""
        o = self.owner
        rows = getattr(o, f"weight_packed_{p}")[self.offset() : self.offset() + self.out_features]
        return unpack_mma_weight(rows, o.w_bits[p], o.sizes[p])

    # ------------------------------------------------------------------ compute
    def site_forward(self, x: Tensor) -> Tensor:
        """All the site's outputs, ``(..., D)``, for input ``x`` (owner only)."""
        ctx = self.context
        mask = None if ctx is None else ctx.mask_for(x)
        return site_linear(x, self.params(), mask, out_dtype=x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        owner = self.owner
        n = len(owner.out_splits)
        if n == 1:
            return owner.site_forward(x)
        # The site's linears read the same tensor one after the other (q, k, v): the first
        # call computes every output, the others take their columns. The memo is dropped once
        # each member has read it, so no stale tensor outlives a forward.
        memo = owner._memo
        if memo is None or memo[0] is not x or memo[2][self.index]:
            memo = (x, owner.site_forward(x), [False] * n)
        memo[2][self.index] = True
        owner._memo = None if all(memo[2]) else memo
        lo = self.offset()
        return memo[1][..., lo : lo + self.out_features]

    def _apply(self, fn, recurse: bool = True):
        return _keep_fp32(self, fn, recurse)

    def extra_repr(self) -> str:
        o = self.owner
        site = "owner" if self.is_owner else f"site_ref={self.site_ref!r}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {site}, "
            f"sizes={o.sizes}, factors={o.dims}, weight_bits={o.w_bits}, act_bits={o.a_bits}"
        )


def site_members(model: nn.Module) -> list[tuple[str, SplitQSiteLinear]]:
    """``(name, module)`` of every :class:`SplitQSiteLinear` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SplitQSiteLinear)]
