"""Suite files (``experiments/*.yaml``) as typed dataclasses, and the ``RunSpec`` of each (variant, seed).

A suite is loaded through the same machinery as a training config (``configtools.from_dict``): an
unknown key or a wrong type is a ``ConfigError`` naming the suite file and the dotted field
(``variants[3].overides``), with a suggestion. The schema is documented in docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..configtools import ConfigError, from_dict, load_yaml

# the suites of the source checkout (not package data: an installed package runs a suite .yaml by path)
SUITE_DIR = Path(__file__).resolve().parents[2] / "experiments"


@dataclass
class EvalSpec:
    """How every finished run is evaluated and analysed."""

    split: str = "val"  # the data split every table number is measured on
    extra_k: list[int] = field(default_factory=lambda: [1])  # inference top-k values besides the training one
    analysis_tokens: int = 512  # tokens of the split for the collapse analysis (0: no analysis)
    jacobian_tokens: int = 128  # of those, how many get their Jacobians taken
    s2moe_both_pathways: bool = True  # also evaluate S2MoE models with both pathways at inference


@dataclass
class Variant:
    """One model of the comparison: its config and/or overrides, trained over the suite's seeds."""

    name: str = ""  # unique in the suite; runs go to runs/<name>-seed<S>
    config: str | None = None  # its config file (default: the suite's base)
    overrides: list[str] = field(default_factory=list)  # applied after the suite's overrides
    seeds: list[int] | None = None  # its own seed list (default: the suite's)
    label: str = ""  # how the report's statements call it, e.g. "SMoE top-2" (default: name)
    # a tuning grid {override key: {label: value}}: the variant becomes one variant per point, named
    # <name>-<label>[-<label>...] (keys in the order given), each of method <name>
    grid: dict = field(default_factory=dict)
    # take the point that the suite's `tuning` sweep selected for this method (a gridded variant's name
    # there): the point's overrides go before this variant's own
    tuned: str = ""
    method: str = field(default="", init=False)  # a grid point's method (the gridded variant's name)
    point: list[str] = field(default_factory=list, init=False)  # a grid point's overrides
    tuned_point: str = field(default="", init=False)  # the sweep variant `tuned` resolved to

    @property
    def display(self) -> str:
        return self.label or self.name


# what each kind of claim compares: the Claim fields it needs (the others must stay unset)
CLAIM_FIELDS = {
    "parity": ("candidate", "baseline"),  # candidate within `margin` % of baseline? (paired t interval)
    "compute": ("candidate", "baseline"),  # inference and training FLOPs and throughput, side by side
    "one_expert": ("candidate", "baselines"),  # candidate against each baseline run at top-1
    "rank": ("candidate", "baselines"),  # which baselines score a lower mean than candidate at training top-k
    "ablations": ("baseline", "candidates"),  # each candidate (an ablation) paired with the baseline
    "dense": ("baseline", "candidates"),  # which models at one expert per token beat the dense baseline
    "gap": ("candidate", "baseline"),  # the paired gap of candidate relative to baseline
    "collapse": ("candidate", "baseline"),  # paired differences of the collapse diagnostics
}
OPTIONAL = {"dense": {"candidates"}}  # dense: default every variant


@dataclass
class Claim:
    """A statement the report computes from the table: which variants it compares comes from here."""

    kind: str = ""  # one of CLAIM_FIELDS
    name: str = ""  # the statement's heading; {metric}, {margin}, {candidate}, {baseline} are filled in
    candidate: str = ""
    baseline: str = ""
    candidates: list[str] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    margin: float = 1.0  # parity: the largest gap (percent) that counts as parity
    note: str = ""  # compute: a remark on the training cost, quoted after it

    def variants(self) -> list[str]:
        return [v for v in (self.candidate, self.baseline, *self.candidates, *self.baselines) if v]


@dataclass
class TuningSpec:
    """Where the settings of ``tuned`` variants come from: a sweep suite and its results folder."""

    suite: str = ""  # the sweep suite (a name in experiments/ or a .yaml path)
    folder: str = ""  # its results folder (default: results/<sweep suite name>)


@dataclass
class Suite:
    """A suite file: a base config, shared overrides, seeds, the evaluation, the variants and the claims."""

    description: str = ""
    base: str | None = None  # the config of every variant that names none
    overrides: list[str] = field(default_factory=list)  # applied to every run, before the variant's
    seeds: list[int] = field(default_factory=lambda: [0])
    nproc: int = 1  # processes per run (>1: the deepspeed launcher)
    eval: EvalSpec = field(default_factory=EvalSpec)
    tuning: TuningSpec = field(default_factory=TuningSpec)
    variants: list[Variant] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    name: str = field(default="", init=False)  # the file's stem: the default results folder
    path: Path | None = field(default=None, init=False)
    seeds_given: bool = field(default=False, init=False)  # --seeds replaced `seeds` (and filters a variant's own)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def variant_seeds(self, variant: Variant) -> list[int]:
        """A variant's own seed list, or the suite's (``--seeds`` replaces the suite's and filters a
        variant's own)."""
        if variant.seeds is None:
            return list(self.seeds)
        if self.seeds_given:
            return [s for s in variant.seeds if s in self.seeds]
        return list(variant.seeds)


SOURCE_OVERRIDE = "data.source="


@dataclass
class RunSpec:
    """Everything that decides a run's numbers: its config file and overrides, in order."""

    variant: str
    seed: int
    config: str | None
    overrides: list[str]
    nproc: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The spec as far as it decides the numbers: ``data.source=`` overrides left out (where the corpus
        file sits; runs of the suite train on the data prepared once into ``data.data_dir``)."""
        d = self.to_dict()
        d["overrides"] = [o for o in self.overrides if not o.startswith(SOURCE_OVERRIDE)]
        return d

    def same_run(self, other: RunSpec | dict) -> bool:
        other = other if isinstance(other, RunSpec) else RunSpec.from_record(other)
        return self.identity() == other.identity()

    @classmethod
    def from_record(cls, record: dict) -> RunSpec:
        """The spec part of a spec.json / result.json record (other keys ignored)."""
        return cls(**{f.name: record.get(f.name) for f in dataclasses.fields(cls)})


def run_spec(suite: Suite, variant: Variant, seed: int, steps: int | None) -> RunSpec:
    overrides = list(suite.overrides) + list(variant.overrides) + [f"train.seed={seed}"]
    if steps:
        overrides.append(f"train.steps={steps}")
    return RunSpec(variant.name, seed, variant.config or suite.base, overrides, suite.nproc)


def find_suite(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"suite file {name!r} does not exist")
        return p
    path = SUITE_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(q.stem for q in SUITE_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown suite {name!r}; known suites: {', '.join(known)} (or pass a suite .yaml path)")
    return path


def load_suite(path: Path) -> Suite:
    try:
        data = load_yaml(Path(path).read_text(), f"suite {path}")
    except yaml.YAMLError as e:
        raise ConfigError(f"suite {path} is not valid YAML: {e}") from None
    return suite_from_dict(data, path)


def suite_from_dict(data: dict | None, path: Path | str) -> Suite:
    """Build and check a Suite; every error names the suite file."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"suite {path}: expected a mapping of suite fields, got {type(data).__name__}")
    try:
        suite = from_dict(Suite, data or {})
    except ConfigError as e:
        raise ConfigError(f"suite {path}: {e}") from None
    suite.name, suite.path = Path(path).stem, Path(path)
    if not suite.variants:
        raise ConfigError(f"suite {path}: 'variants' must list at least one variant (name + config/overrides)")
    suite.variants = [point for v in suite.variants for point in expand_grid(v, f"suite {path}")]
    names = [v.name for v in suite.variants]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"suite {path}: every variant needs a unique 'name'; got {names}")
    for i, claim in enumerate(suite.claims):
        check_claim(claim, f"suite {path}: claims[{i}]", names)
    tuned = [v.name for v in suite.variants if v.tuned]
    if tuned and not suite.tuning.suite:
        raise ConfigError(
            f"suite {path}: variants {tuned} name a 'tuned' method but the suite has no 'tuning: {{suite: ...}}' "
            f"to take it from"
        )
    return suite


def format_value(value) -> str:
    """A grid value as an override's right-hand side (parsed back as a YAML scalar)."""
    return "true" if value is True else "false" if value is False else str(value)


def expand_grid(variant: Variant, where: str) -> list[Variant]:
    """A variant with a ``grid`` as one variant per grid point (itself when it has none)."""
    if not variant.grid:
        return [variant]
    axes = []
    for key, choices in variant.grid.items():
        if not isinstance(choices, dict) or not choices:
            raise ConfigError(
                f"{where}: variant {variant.name!r} grid key {key!r} must map labels to values, e.g. "
                f"{{lr1e-3: 1.0e-3, lr2e-3: 2.0e-3}}; got {choices!r}"
            )
        axes.append([(str(label), f"{key}={format_value(value)}") for label, value in choices.items()])
    points = []
    for combo in itertools.product(*axes):
        point = dataclasses.replace(variant, grid={}, overrides=list(variant.overrides) + [o for _, o in combo])
        point.name = "-".join([variant.name, *(label for label, _ in combo)])
        point.method, point.point = variant.name, [o for _, o in combo]
        points.append(point)
    return points


def check_claim(claim: Claim, where: str, variants: list[str]) -> None:
    if claim.kind not in CLAIM_FIELDS:
        raise ConfigError(f"{where}: kind {claim.kind!r} is not one of {', '.join(CLAIM_FIELDS)}")
    where = f"{where} ({claim.kind})"
    needed = CLAIM_FIELDS[claim.kind]
    for name in ("candidate", "baseline", "candidates", "baselines"):
        given = bool(getattr(claim, name))
        if given and name not in needed:
            raise ConfigError(f"{where}: '{name}' is not used by this kind; it takes {', '.join(needed)}")
        if not given and name in needed and name not in OPTIONAL.get(claim.kind, ()):
            raise ConfigError(f"{where}: needs '{name}' (it takes {', '.join(needed)})")
    for v in claim.variants():
        if v not in variants:
            raise ConfigError(
                f"{where} names variant {v!r}, which the suite does not have; its variants: {', '.join(variants)}"
            )
    try:
        claim.name.format(metric="bpc", margin="1", candidate="a", baseline="b")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"{where}: name {claim.name!r} has a bad placeholder ({e}); it may use "
            f"{{metric}}, {{margin}}, {{candidate}} and {{baseline}}"
        ) from None
