"""One schema for a whole run: a section per stage, read from YAML plus ``--set a.b=value`` overrides.

Every section forbids unknown keys, so a typo is an error that names the dotted path of the bad key and
what was expected, never a silently ignored setting. Field docstrings are the settings' help text: `mmsae
config show --explain` prints each one beside its value (:func:`explain_config`).

Seeds: every section with a ``seed`` leaves it unset by default, and validation of the :class:`RunConfig`
gives it ``run.seed``; a section seed set explicitly wins. After validation every seed is an int, so what
a stage records (its manifest, its MLflow params) is the seed it used.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from mmsae.config_sections import (  # noqa: F401 - re-exported: callers import sections from here
    DEFAULT_SEED,
    AttributeConfig,
    AttributionExample,
    CacheConfig,
    ConfigError,
    ExplainConfig,
    MineConfig,
    ReportConfig,
    RunSection,
    SaeVariant,
    ScoreConfig,
    Section,
    SeededSection,
    SteerConfig,
    ToyLMMConfig,
    ToyWorldConfig,
    TrackingConfig,
    TrainConfig,
)


class RunConfig(Section):
    run: RunSection = RunSection()
    """The run as a whole: its name, where it writes, its seed."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow tracking of every stage."""
    toyworld: ToyWorldConfig = ToyWorldConfig()
    """The toy world's generated scenes (`mmsae toyworld build`, the pipeline's inputs without an image set)."""
    toylmm: ToyLMMConfig = ToyLMMConfig()
    """The toy LMM trained on the toy world."""
    cache: CacheConfig = CacheConfig()
    """The cache stage (`mmsae cache`): activations of LMM layers over an image set."""
    train: TrainConfig = TrainConfig()
    """The train stage (`mmsae train`): TopK SAEs on the cached activations."""
    mine: MineConfig = MineConfig()
    """The mine stage (`mmsae mine`): each feature's top images and heat maps."""
    explain: ExplainConfig = ExplainConfig()
    """The explain stage (`mmsae explain`): a short description of each selected feature, from its masked top
    images."""
    score: ScoreConfig = ScoreConfig()
    """The score stage (`mmsae score`): IoU, CLIP score, detection and ground truth of the explanations, each
    beside its random baseline."""
    steer: SteerConfig = SteerConfig()
    """The steer stage (`mmsae steer`): clamp features during generation and measure what changes."""
    attribute: AttributeConfig = AttributeConfig()
    """The attribute stage (`mmsae attribute`): the SAE features behind an answer, from one forward and one
    backward pass."""
    report: ReportConfig = ReportConfig()
    """The report stage (`mmsae report`): the HTML dashboard."""

    @model_validator(mode="after")
    def _section_seeds_from_run(self) -> RunConfig:
        """Every seeded section whose seed was not set takes ``run.seed``."""
        for name in type(self).model_fields:
            section = getattr(self, name)
            if not isinstance(section, SeededSection) or "seed" in section.model_fields_set:
                continue
            if section.seed != self.run.seed:
                resolved = section.model_copy(update={"seed": self.run.seed})  # never changes the caller's
                resolved.model_fields_set.discard("seed")  # still run.seed's, should run.seed change
                self.__dict__[name] = resolved
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key `{path}`")
        else:
            got = e.get("input")
            lines.append(f"{source}: `{path}`: {e['msg']} (got {got!r})")
    return "\n".join(lines)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"override key {dotted!r}: expected dotted names like `cache.batch_size`")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override `{dotted}`: `{k}` is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str], raw_values: dict[tuple[str, ...], str] | None = None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists.

    ``raw_values``, when given, receives each override's text by key path (a text field given `yes` or
    `2024` takes the text, not YAML's bool or number: see :func:`load_config`).
    """
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. `cache.batch_size=8`")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override `{key}`: value {raw!r} is not valid YAML: {e}") from e
        set_dotted(out, key.strip(), value)
        if raw_values is not None:
            raw_values[tuple(key.strip().split("."))] = raw
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config from a YAML file (or the defaults when ``path`` is None), then apply overrides."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        raw: dict[tuple[str, ...], str] = {}
        data = _merge(data, parse_overrides(overrides, raw))
        source = f"{source} (with overrides)"
        try:
            return RunConfig.model_validate(data)
        except ValidationError as e:
            # an override for a text field that YAML read as a bool or a number: take its text
            texts = [tuple(map(str, x["loc"])) for x in e.errors() if x["type"] == "string_type"]
            if texts and all(loc in raw for loc in texts):
                for loc in texts:
                    set_dotted(data, ".".join(loc), raw[loc])
    return from_dict(data, source)


def dump_config(cfg: BaseModel) -> str:
    """The config as YAML, every default written out (what a stage records in its manifest)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


EXPLAIN_WIDTH = 110
"""Line width of the comments :func:`explain_config` writes."""


def explain_config(cfg: RunConfig) -> str:
    """The config as YAML, section by section, each key under its docstring as a comment (what `mmsae config
    show --explain` prints); the text parses back to the same config."""
    values = cfg.model_dump(mode="json")
    lines: list[str] = []
    for section_name, section_field in type(cfg).model_fields.items():
        lines += _comment_lines(section_field.description, "")
        lines.append(f"{section_name}:")
        for key, field in type(getattr(cfg, section_name)).model_fields.items():
            lines += _comment_lines(field.description, "  ")
            lines.append(f"  {key}: {_inline_yaml(values[section_name][key])}")
        lines.append("")
    return "\n".join(lines)


def _comment_lines(text: str | None, indent: str) -> list[str]:
    if not text:
        return []
    prefix = f"{indent}# "
    return textwrap.wrap(" ".join(text.split()), width=EXPLAIN_WIDTH, initial_indent=prefix,
                         subsequent_indent=prefix, break_long_words=False, break_on_hyphens=False)


def _inline_yaml(value: Any) -> str:
    """One value as YAML on one line (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def config_from_yaml(text: str, source: str = "config") -> RunConfig:
    """Parse a run config from YAML text (how KFP components receive it)."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return from_dict(data, source)
