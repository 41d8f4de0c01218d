"""De-identification settings a site chooses: profile options, burned-in policy, limits.

:class:`DeidConfig` is frozen and built once, by :meth:`DeidConfig.from_mapping` from the
node's configuration (a TOML table) or directly in code. ``from_mapping`` reports every
problem at once, by field, with a suggestion for misspelt keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field

from imaging.errors import ImagingConfigError, ProfileError
from imaging.pixels import DEFAULT_SUSPECT_MODALITIES, BurnedInMode, BurnedInPolicy, CleaningRule, Region
from imaging.profile import ProfileOption, parse_options

__all__ = ["DeidConfig", "SafePrivateTag"]

_MAX_SHIFT_LIMIT = 36_500


@dataclass(frozen=True)
class SafePrivateTag:
    """A private attribute the site has judged safe: creator, group and element byte.

    ``element`` is the low byte of the element number (``0x00``-``0xFF``) within the block
    the creator reserved, as private dictionaries list them.
    """

    creator: str
    group: int
    element: int


@dataclass(frozen=True)
class DeidConfig:
    """Everything that shapes a de-identification run, besides the node secret.

    Attributes
    ----------
    options
        PS3.15 options selected on top of the Basic Profile.
    burned_in
        What happens to images that may carry text in their pixels.
    max_date_shift_days
        Upper bound of the keyed per-patient date shift (Modified Dates option).
    safe_private
        Private attributes kept under the Retain Safe Private option; all others go.
    """

    options: frozenset[ProfileOption] = frozenset()
    burned_in: BurnedInPolicy = field(default_factory=BurnedInPolicy)
    max_date_shift_days: int = 3650
    safe_private: frozenset[SafePrivateTag] = frozenset()

    def __post_init__(self) -> None:
        problems = _check_shift(self.max_date_shift_days, "max_date_shift_days")
        if problems:
            raise ImagingConfigError(problems)
        try:
            parse_options([o.value for o in self.options])
        except ProfileError as exc:
            raise ImagingConfigError([str(exc)]) from None

    @property
    def option_names(self) -> tuple[str, ...]:
        """Selected option names in the table's column order."""
        return tuple(o.value for o in ProfileOption if o in self.options)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object], *, prefix: str = "deid") -> DeidConfig:
        """Build from a decoded configuration table; raises ImagingConfigError listing all problems."""
        problems: list[str] = []
        _unknown_keys(mapping, {"options", "burned_in", "max_date_shift_days", "safe_private"}, prefix, problems)

        options: frozenset[ProfileOption] = frozenset()
        raw_options = mapping.get("options", [])
        if not isinstance(raw_options, list) or not all(isinstance(o, str) for o in raw_options):
            problems.append(f"{prefix}.options must be a list of option names; found {type(raw_options).__name__}")
        else:
            try:
                options = parse_options(raw_options, field_name=f"{prefix}.options")
            except ProfileError as exc:
                problems.append(str(exc))

        shift = mapping.get("max_date_shift_days", 3650)
        problems += _check_shift(shift, f"{prefix}.max_date_shift_days")

        burned_in = _parse_burned_in(mapping.get("burned_in", {}), f"{prefix}.burned_in", problems)
        safe = _parse_safe_private(mapping.get("safe_private", []), f"{prefix}.safe_private", problems)
        if problems:
            raise ImagingConfigError(problems)
        assert isinstance(shift, int)
        return cls(options=options, burned_in=burned_in, max_date_shift_days=shift, safe_private=safe)


def _check_shift(value: object, name: str) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SHIFT_LIMIT:
        return [f"{name} must be an integer in 1..{_MAX_SHIFT_LIMIT}; found {value!r}"]
    return []


def _unknown_keys(mapping: Mapping[str, object], known: set[str], prefix: str, problems: list[str]) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {sorted(known)}"
            problems.append(f"{prefix}.{key} is not a setting{hint}")


def _int_field(raw: Mapping[str, object], key: str, name: str, problems: list[str], *, minimum: int = 0) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        problems.append(f"{name}.{key} must be an integer >= {minimum}; found {value!r}")
        return None
    return value


def _parse_burned_in(raw: object, name: str, problems: list[str]) -> BurnedInPolicy:
    if not isinstance(raw, Mapping):
        problems.append(f"{name} must be a table; found {type(raw).__name__}")
        return BurnedInPolicy()
    _unknown_keys(raw, {"mode", "rules", "suspect_modalities"}, name, problems)
    mode_raw = raw.get("mode", BurnedInMode.EXCLUDE.value)
    mode = BurnedInMode.EXCLUDE
    if mode_raw not in {m.value for m in BurnedInMode}:
        problems.append(f"{name}.mode must be 'clean' or 'exclude'; found {mode_raw!r}")
    else:
        mode = BurnedInMode(mode_raw)
    suspects_raw = raw.get("suspect_modalities", sorted(DEFAULT_SUSPECT_MODALITIES))
    suspects = DEFAULT_SUSPECT_MODALITIES
    if not isinstance(suspects_raw, list) or not all(isinstance(m, str) for m in suspects_raw):
        problems.append(f"{name}.suspect_modalities must be a list of modality codes")
    else:
        suspects = frozenset(m.strip().upper() for m in suspects_raw)
    rules: list[CleaningRule] = []
    rules_raw = raw.get("rules", [])
    if not isinstance(rules_raw, list):
        problems.append(f"{name}.rules must be a list of tables")
        rules_raw = []
    for index, rule_raw in enumerate(rules_raw):
        rule_name = f"{name}.rules[{index}]"
        if not isinstance(rule_raw, Mapping):
            problems.append(f"{rule_name} must be a table")
            continue
        _unknown_keys(rule_raw, {"regions", "modality", "manufacturer", "model", "rows", "columns"}, rule_name, problems)
        strings: dict[str, str | None] = {}
        for key in ("modality", "manufacturer", "model"):
            value = rule_raw.get(key)
            if value is not None and not isinstance(value, str):
                problems.append(f"{rule_name}.{key} must be a string; found {type(value).__name__}")
                value = None
            strings[key] = value
        rows = _int_field(rule_raw, "rows", rule_name, problems, minimum=1)
        columns = _int_field(rule_raw, "columns", rule_name, problems, minimum=1)
        regions: list[Region] = []
        regions_raw = rule_raw.get("regions")
        if not isinstance(regions_raw, list) or not regions_raw:
            problems.append(f"{rule_name}.regions must be a non-empty list of {{top, left, bottom, right}}")
            regions_raw = []
        for r_index, region_raw in enumerate(regions_raw):
            r_name = f"{rule_name}.regions[{r_index}]"
            if not isinstance(region_raw, Mapping):
                problems.append(f"{r_name} must be a table")
                continue
            _unknown_keys(region_raw, {"top", "left", "bottom", "right"}, r_name, problems)
            values = {k: _int_field(region_raw, k, r_name, problems) for k in ("top", "left", "bottom", "right")}
            if any(v is None for v in values.values()):
                missing = [k for k, v in values.items() if v is None and k not in region_raw]
                if missing:
                    problems.append(f"{r_name} lacks {', '.join(missing)}")
                continue
            region = Region(**values)  # type: ignore[arg-type]
            problems += [f"{r_name}: {p}" for p in region.problems()]
            regions.append(region)
        rules.append(CleaningRule(regions=tuple(regions), rows=rows, columns=columns, **strings))
    if mode is BurnedInMode.CLEAN and not rules_raw:
        problems.append(f"{name}.rules must list at least one rule when mode is 'clean'")
    return BurnedInPolicy(mode=mode, rules=tuple(rules), suspect_modalities=suspects)


def _parse_safe_private(raw: object, name: str, problems: list[str]) -> frozenset[SafePrivateTag]:
    if not isinstance(raw, list):
        problems.append(f"{name} must be a list of {{creator, group, element}} tables")
        return frozenset()
    out: set[SafePrivateTag] = set()
    for index, entry in enumerate(raw):
        e_name = f"{name}[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{e_name} must be a table")
            continue
        _unknown_keys(entry, {"creator", "group", "element"}, e_name, problems)
        creator, group, element = entry.get("creator"), entry.get("group"), entry.get("element")
        ok = True
        if not isinstance(creator, str) or not creator.strip():
            problems.append(f"{e_name}.creator must be a non-empty string")
            ok = False
        if isinstance(group, bool) or not isinstance(group, int) or not (0x0009 <= group <= 0xFFFF and group % 2):
            problems.append(f"{e_name}.group must be an odd group number above 0x0008; found {group!r}")
            ok = False
        if isinstance(element, bool) or not isinstance(element, int) or not 0 <= element <= 0xFF:
            problems.append(f"{e_name}.element must be the element byte 0x00..0xFF; found {element!r}")
            ok = False
        if ok:
            assert isinstance(creator, str) and isinstance(group, int) and isinstance(element, int)
            out.add(SafePrivateTag(creator=creator.strip(), group=group, element=element))
    return frozenset(out)
