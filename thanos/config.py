"""Typed, self-validating pruning settings: a preset plus per-step overrides, built into a recipe.

`"2:4"` is parsed once into a `Pattern`; impossible combinations fail here, at construction,
with a message that names the fix, so solvers can trust what they are given. What runs is the
`recipe` (`thanos.recipe`): the pattern and the configured steps, recorded in every report.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from thanos.pattern import ConfigError, Pattern
from thanos.recipe import METHODS, MaskSearch, Permute, Quantize, Recipe, Reconstruct, Refit, Solve

# Default block sizes (columns per block) of the methods without presets. The paper uses 128 for
# unstructured and 512 for n:m; SparseGPT's reference code uses 128.
DEFAULT_BLOCK_SIZE = {"unstructured": 128, "nm": 128, "columns": None}
SPARSEGPT_BLOCK_SIZE = 128
# The default preset's refit stops once an iteration lowers the layer's error by less than this
# share of it: the same whole-model quality in about half the iterations; `best` runs every one,
# which paid there (docs/results/README.md, round 5).
REFIT_TOLERANCE = 1e-4
# Migration strength of activation ranges into the weights before 8-bit quantization (thanos.smooth):
# INT8's uniform grid needs it, each input's strength chosen from an error estimate ("auto"); FP8
# gained nothing from 0.5 (docs/results/quantize_2of4_cpu.md).
DEFAULT_SMOOTHING = {"int8": "auto", "fp8": 0.0}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named Thanos recipe, chosen on whole-model perplexity and pruning time (docs/results/)."""

    block_size: dict  # pattern kind -> columns per block (None: the whole row)
    refit_iterations: int
    reconstruct_epochs: int
    summary: str
    reconstruct_lr: float = 1e-3  # Adam's step; also the default when reconstruction is asked for by hand
    mask_search_iterations: int = 0  # ADMM iterations over mask and weights (none for 'columns': it moves weights)
    permute_channels: bool = False  # reorder free channels (n:m only: other patterns have no groups)
    refit_tolerance: float = 0.0  # the refit stops once an iteration gains less than this share of the error
    # With --quantize, solve a layer's linears group by group on the (8-bit) pruned layer's inputs:
    # it paid there, and was a wash without the 8-bit step (docs/results/README.md, round 8).
    sequential_with_8bit: bool = False

    def value(self, option: str, pattern: Pattern):
        """The preset's value of a step option for `pattern`: no permutations without n:m groups, and no
        mask search for 'columns' (it moves single weights)."""
        if option == "permute_channels":
            return self.permute_channels and pattern.is_nm
        if option == "mask_search_iterations" and pattern.kind == "columns":
            return 0
        return getattr(self, option)


PRESETS = {
    "fast": Preset({"nm": 128, "unstructured": 128, "columns": None}, 0, 0,
                   "the paper's block-wise solve alone"),
    "default": Preset({"nm": 32, "unstructured": 128, "columns": None}, 10, 0,
                      "free channels permuted for n:m, smaller blocks, a short mask search, then the kept weights "
                      "refit on the final mask; with --quantize, each layer's linears solved and quantized group "
                      "by group", mask_search_iterations=10, permute_channels=True, refit_tolerance=REFIT_TOLERANCE,
                      sequential_with_8bit=True),
    "best": Preset({"nm": 32, "unstructured": 128, "columns": None}, 20, 2,
                   "as default with a longer mask search and refit, then each decoder layer tuned towards the dense "
                   "layer's outputs", mask_search_iterations=30, permute_channels=True),
}
DEFAULT_PRESET = "default"


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Everything that decides how a model's weights are pruned: a preset plus per-step overrides.

    Validates itself, and builds the `recipe` that runs (`thanos.recipe`): the pattern and the
    configured steps. `sparsity=None` means 0.5 for unstructured and columns, and n/m for an n:m
    pattern (which fixes it). For Thanos, `preset` (a name in `PRESETS`, `"default"` if None)
    fills every step option left as None; the other methods have no presets, and their optional
    steps are off unless asked for. `block_size=None` picks `DEFAULT_BLOCK_SIZE` for them.
    `mask_search_iterations` moves mask and weights together from the solver's result;
    `refit_iterations` (at most) re-solves the kept weights for the final mask; `sequential` solves a
    decoder layer's linears group by group, each on the inputs the layer gives it once the groups
    before it are pruned (and quantized; None: the preset's, which for `default` is on with
    `quantize`); `reconstruct_epochs` tunes
    each pruned decoder layer towards `reconstruct_target` ("layer" if None); `permute_channels`
    reorders the channels a model family leaves free before an n:m pattern groups them; `quantize`
    ("fp8" or "int8", None for none) turns the final weights and each linear's input into 8 bits
    with `quantize_rounding` ("compensated" if None), after moving activation ranges into the
    weights with strength `quantize_smoothing` (`DEFAULT_SMOOTHING` if None); `quantize_inputs`
    scales each linear's input once from calibration ("static", if None) or per token at run time
    ("per-token"). An option
    that the recipe would not use (a preset for another method, a reconstruction target without
    reconstruction) is refused, never ignored.
    """

    method: str = "thanos"
    pattern: Pattern = dataclasses.field(default_factory=lambda: Pattern.parse("2:4"))
    sparsity: Optional[float] = None
    block_size: Optional[int] = None
    alpha: float = 0.0
    damp: float = 0.01
    refit_iterations: Optional[int] = None
    mask_search_iterations: Optional[int] = None
    reconstruct_epochs: Optional[int] = None
    reconstruct_lr: Optional[float] = None
    reconstruct_target: Optional[str] = None
    preset: Optional[str] = None
    permute_channels: Optional[bool] = None
    quantize: Optional[str] = None
    quantize_rounding: Optional[str] = None
    quantize_smoothing: "float | str | None" = None  # a strength in [0, 1], or "auto"
    quantize_inputs: Optional[str] = None  # "static" (if None) or "per-token"
    refit_tolerance: Optional[float] = None
    sequential: Optional[bool] = None
    recipe: Recipe = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("pattern", Pattern.parse(self.pattern))
        pattern = self.pattern
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.preset is not None and self.method != "thanos":
            raise ConfigError(f"presets are Thanos recipes; method {self.method!r} has none: drop the preset, or "
                              "set the steps you want (refit, mask search, ...) one by one")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.method == "thanos":
            set_("preset", self.preset or DEFAULT_PRESET)
        preset = PRESETS.get(self.preset)
        for field, off in (("permute_channels", False), ("refit_iterations", 0), ("mask_search_iterations", 0),
                           ("reconstruct_epochs", 0)):
            if getattr(self, field) is None:
                set_(field, preset.value(field, pattern) if preset else off)
        for field in ("refit_iterations", "mask_search_iterations", "reconstruct_epochs"):
            if getattr(self, field) < 0:
                raise ConfigError(f"{field} must be 0 (the step left out) or positive, got {getattr(self, field)}")
        if not self.refit_iterations and self.refit_tolerance is not None:
            raise ConfigError("refit_tolerance applies to the refit, which this recipe leaves out; pass "
                              "refit_iterations too, or drop it")
        if self.refit_iterations and self.refit_tolerance is None:
            set_("refit_tolerance", preset.refit_tolerance if preset else 0.0)
        if not self.reconstruct_epochs:
            for field in ("reconstruct_target", "reconstruct_lr"):
                if getattr(self, field) is not None:
                    raise ConfigError(f"{field} applies to the reconstruction, which this recipe leaves out; pass "
                                      "reconstruct_epochs too (or preset 'best'), or drop it")
        for field in ("quantize_rounding", "quantize_smoothing", "quantize_inputs"):
            if self.quantize is None and getattr(self, field) is not None:
                raise ConfigError(f"{field} applies to the 8-bit step, which this recipe leaves out; pass "
                                  "quantize ('fp8' or 'int8') too, or drop it")
        if self.quantize is not None and self.quantize_rounding is None:
            set_("quantize_rounding", "compensated")
        if self.quantize is not None and self.quantize_smoothing is None:
            set_("quantize_smoothing", DEFAULT_SMOOTHING.get(self.quantize, 0.0))
        if self.quantize is not None and self.quantize_inputs is None:
            set_("quantize_inputs", "static")
        if self.sequential is None:
            set_("sequential", bool(preset and preset.sequential_with_8bit and self.quantize is not None))
        if self.reconstruct_lr is None:
            set_("reconstruct_lr", (preset or PRESETS[DEFAULT_PRESET]).reconstruct_lr)
        if self.reconstruct_target is None:
            set_("reconstruct_target", "layer")
        if pattern.is_nm:
            implied = pattern.n / pattern.m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ConfigError(
                    f"pattern {pattern} fixes the sparsity at {implied:g}, but sparsity={self.sparsity:g} "
                    f"was asked for; omit sparsity or pass {implied:g}, or use pattern 'unstructured' "
                    f"for sparsity {self.sparsity:g}"
                )
            set_("sparsity", implied)
        elif self.sparsity is None:
            set_("sparsity", 0.5)
        if not (0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        steps = [Permute()] if self.permute_channels else []
        steps.append(Solve(self.method, self.resolved_block_size, self.alpha, self.damp, self.sequential))
        if self.mask_search_iterations:
            steps.append(MaskSearch(self.mask_search_iterations))
        if self.refit_iterations:
            steps.append(Refit(self.refit_iterations, self.refit_tolerance))
        if self.reconstruct_epochs:
            steps.append(Reconstruct(self.reconstruct_epochs, self.reconstruct_lr, self.reconstruct_target))
        if self.quantize is not None:
            steps.append(Quantize(self.quantize, self.quantize_rounding, self.quantize_smoothing, self.quantize_inputs))
        set_("recipe", Recipe(pattern, self.sparsity, tuple(steps), self.preset))  # each step checks itself

    @property
    def resolved_block_size(self) -> Optional[int]:
        if self.block_size is not None:
            return self.block_size
        if self.method == "sparsegpt":
            return SPARSEGPT_BLOCK_SIZE
        if self.method == "thanos":
            return PRESETS[self.preset].block_size[self.pattern.kind]
        return DEFAULT_BLOCK_SIZE[self.pattern.kind]

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        data["pattern"] = str(self.pattern)
        data["block_size"] = self.resolved_block_size
        if self.quantize is None:  # a recipe without the 8-bit step reads as it did before the step existed
            del data["quantize"], data["quantize_rounding"], data["quantize_smoothing"], data["quantize_inputs"]
        return data

    @classmethod
    def from_recipe(cls, recipe: "Recipe | dict", **overrides) -> "PruneConfig":
        """The config that runs `recipe` (a Recipe, or its JSON as a report records it), with `overrides`
        (PruneConfig fields) applied on top."""
        if isinstance(recipe, dict):
            recipe = Recipe.from_json(recipe)
        solve, refit = recipe.solve, recipe.get(Refit)
        search, reconstruct, quantize = recipe.get(MaskSearch), recipe.get(Reconstruct), recipe.get(Quantize)
        fields = dict(method=solve.method, pattern=recipe.pattern, sparsity=recipe.sparsity,
                      block_size=solve.block_size, alpha=solve.alpha, damp=solve.damp, sequential=solve.sequential,
                      refit_iterations=refit.iterations if refit else 0,
                      refit_tolerance=refit.tolerance if refit else None,
                      mask_search_iterations=search.iterations if search else 0,
                      reconstruct_epochs=reconstruct.epochs if reconstruct else 0,
                      reconstruct_lr=reconstruct.lr if reconstruct else None,
                      reconstruct_target=reconstruct.target if reconstruct else None,
                      permute_channels=recipe.get(Permute) is not None,
                      quantize=quantize.format if quantize else None,
                      quantize_rounding=quantize.rounding if quantize else None,
                      quantize_smoothing=quantize.smoothing if quantize else None,
                      quantize_inputs=quantize.inputs if quantize else None,
                      preset=recipe.preset if solve.method == "thanos" else None)
        fields.update(overrides)
        # An override that leaves a step out takes the recipe's options for that step with it.
        for count, options in (("refit_iterations", ("refit_tolerance",)),
                               ("reconstruct_epochs", ("reconstruct_lr", "reconstruct_target"))):
            if fields[count] == 0:
                fields.update({option: None for option in options if option not in overrides})
        return cls(**fields)
