"""The registry loader: every problem in ``experts.yaml`` as ``file:line: field: message``.

Fast unit tests: no network, no vLLM. Each test writes a small YAML file (or text)
and asserts the exact lines the operator would see.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml
from pydantic import AfterValidator, BaseModel, ValidationError

from coe.config import ExpertConfig, RegistryConfig
from coe.errors import CoeError, ConfigError
from coe.loader import (
    _line_of,
    check_expert,
    clean_loc,
    cross_check,
    format_loc,
    load_registry,
    parse_registry,
    validation_problems,
)

NAME_HELP = "use 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"
ONE_KIND = "give exactly one of 'url' (a running server) or 'launch' (coe starts one)"


def write(folder: Path, text: str, name: str = "experts.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def errors_of(text: str, source: str = "experts.yaml", base: Path | None = None) -> list[str]:
    """The lines ``parse_registry`` reports for ``text`` (it must fail)."""
    with pytest.raises(ConfigError) as info:
        parse_registry(textwrap.dedent(text).lstrip("\n"), source, base or Path("/srv/coe"))
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def parse(text: str, base: Path | None = None) -> RegistryConfig:
    return parse_registry(textwrap.dedent(text).lstrip("\n"), "experts.yaml", base or Path("/srv/coe"))


# A small valid header: one URL backend, reused by the error tests below. Indented
# like the test bodies it is glued to (they are dedented together); HEAD_FLAT is not.
HEAD = """
        backends:
          gpu-0:
            url: http://gpu-0:8000/v1"""
HEAD_FLAT = textwrap.dedent(HEAD).lstrip("\n") + "\n"


# -- a valid file ----------------------------------------------------------------------


def test_valid_file_with_url_and_launch_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    path = write(
        folder,
        """
        backends:
          remote:
            url: https://gpu-0:8000/v1
            api_key_env: GPU0_KEY
            timeouts: {connect_s: 1.5}
          local:
            launch:
              model: models/tiny
              lora_modules:
                - name: sql-lora
                  path: adapters/sql
              args: ["--max-model-len", "2048"]
              env: {VLLM_CPU_KVCACHE_SPACE: "1"}
            adapter_roots: [adapters, /abs/roots]
          logged:
            launch:
              model: /opt/models/big
              served_name: big-model
              log_file: logs/big.log
        experts:
          - name: generalist
            backend: remote
            model: Qwen/Qwen2.5-7B-Instruct
            skills: [chat, writing]
            params: {temperature: 0.2}
            cost: {input_per_mtok: 0.1, output_per_mtok: 0.4}
            tier: strong
          - name: sql
            backend: local
            model: tiny
            adapter: {name: sql-lora, path: adapters/sql}
          - name: big
            backend: logged
            model: big-model
        router:
          default_expert: generalist
        """,
    )
    monkeypatch.chdir(tmp_path)  # relative paths follow the file, not the working directory
    cfg = load_registry(path)

    remote = cfg.backends["remote"]
    assert remote.url == "https://gpu-0:8000/v1"
    assert remote.launch is None
    assert remote.api_key_env == "GPU0_KEY"
    assert remote.timeouts.connect_s == 1.5
    assert remote.timeouts.read_s == 300.0
    assert remote.max_concurrency == 256

    local = cfg.backends["local"]
    assert local.url is None
    assert local.launch is not None
    assert local.launch.model == folder / "models" / "tiny"
    assert local.launch.lora_modules[0].path == folder / "adapters" / "sql"
    assert local.launch.log_file == folder / ".coe" / "logs" / "local.log"
    assert local.launch.args == ["--max-model-len", "2048"]
    assert local.launch.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert local.launch.host == "127.0.0.1"
    assert local.launch.port is None
    assert local.adapter_roots == [folder / "adapters", Path("/abs/roots")]

    logged = cfg.backends["logged"]
    assert logged.launch is not None
    assert logged.launch.model == Path("/opt/models/big")
    assert logged.launch.log_file == folder / "logs" / "big.log"

    assert [e.name for e in cfg.experts] == ["generalist", "sql", "big"]
    generalist, sql, _ = cfg.experts
    assert generalist.params == {"temperature": 0.2}
    assert generalist.cost.of(1_000_000, 1_000_000) == pytest.approx(0.5)
    assert generalist.tier == "strong"
    assert generalist.upstream_model == "Qwen/Qwen2.5-7B-Instruct"
    assert sql.adapter is not None
    assert sql.adapter.path == folder / "adapters" / "sql"
    assert sql.upstream_model == "sql-lora"
    assert sql.tier == "standard"
    assert cfg.router.default_expert == "generalist"
    assert cfg.auth.client_auth is True


def test_relative_file_path_resolves_against_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", """
        backends:
          local:
            launch: {model: ./m/../tiny}
    """)
    monkeypatch.chdir(tmp_path)
    cfg = load_registry("conf/experts.yaml")
    launch = cfg.backends["local"].launch
    assert launch is not None
    assert launch.model.is_absolute()
    assert launch.model == tmp_path / "conf" / "tiny"  # normalised: no '..' left
    assert launch.log_file == tmp_path / "conf" / ".coe" / "logs" / "local.log"


def test_parse_registry_makes_a_relative_base_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse("backends:\n  local:\n    launch: {model: tiny}\n", base=Path("conf"))
    launch = cfg.backends["local"].launch
    assert launch is not None
    assert launch.model == tmp_path / "conf" / "tiny"


def test_home_in_paths_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse("backends:\n  local:\n    launch: {model: ~/models/tiny}\n")
    launch = cfg.backends["local"].launch
    assert launch is not None
    assert launch.model == tmp_path / "models" / "tiny"


def test_symlinked_model_folder_keeps_its_name(tmp_path: Path) -> None:
    (tmp_path / "gemma-v3").mkdir()
    (tmp_path / "current").symlink_to(tmp_path / "gemma-v3")
    path = write(tmp_path, """
        backends:
          local:
            launch: {model: current}
        experts:
          - {name: e, backend: local, model: current}
    """)
    cfg = load_registry(path)
    launch = cfg.backends["local"].launch
    assert launch is not None
    # The default served name is the folder's name: following the link would change it.
    assert launch.model == tmp_path / "current"


def test_served_name_defaults_to_the_normalised_folder_name() -> None:
    cfg = parse("""
        backends:
          local:
            launch: {model: models/tiny/sub/..}
        experts:
          - {name: e, backend: local, model: tiny}
    """)
    assert cfg.experts[0].model == "tiny"
    assert errors_of("""
        backends:
          local:
            launch: {model: models/tiny/sub/..}
        experts:
          - {name: e, backend: local, model: ".."}
    """) == ["experts.yaml:5: experts[0].model: backend 'local' serves 'tiny', not '..'"]


def test_yaml_anchors_and_merge_keys_are_supported() -> None:
    cfg = parse(HEAD + """
        experts:
          - &base
            name: a
            backend: gpu-0
            model: m
            skills: &skills [chat]
          - <<: *base
            name: b
            skills: *skills
    """)
    assert [(e.name, e.backend, e.model, e.skills) for e in cfg.experts] == [
        ("a", "gpu-0", "m", ["chat"]),
        ("b", "gpu-0", "m", ["chat"]),
    ]


def test_empty_file_is_an_empty_registry(tmp_path: Path) -> None:
    for text in ("", "\n\n", "# nothing here yet\n", "---\n", "~\n"):
        cfg = load_registry(write(tmp_path, text))
        assert cfg.backends == {}
        assert cfg.experts == []
        assert cfg.router.default_expert is None
        assert cfg.dispatch.retries == 2


# -- cross-references ----------------------------------------------------------------


def test_unknown_backend() -> None:
    assert errors_of(HEAD + """
        experts:
          - name: a
            backend: gpu-0
            model: m
          - name: b
            model: m
            backend: gpu-1
    """) == ["experts.yaml:10: experts[1].backend: unknown backend 'gpu-1' (known: gpu-0)"]


def test_unknown_backend_with_no_backends_declared(tmp_path: Path) -> None:
    path = write(tmp_path, """
        experts:
          - name: a
            backend: gpu-1
            model: m
    """)
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert info.value.errors == [f"{path}:3: experts[0].backend: unknown backend 'gpu-1' (known: none declared)"]
    assert isinstance(info.value, CoeError)


def test_duplicate_expert_names() -> None:
    assert errors_of(HEAD + """
        experts:
          - {name: a, backend: gpu-0, model: m}
          - {name: b, backend: gpu-0, model: m}
          - name: a
            backend: gpu-0
            model: m
          - {name: b, backend: gpu-0, model: m}
    """) == [
        "experts.yaml:7: experts[2].name: duplicate expert name 'a' (also experts[0])",
        "experts.yaml:10: experts[3].name: duplicate expert name 'b' (also experts[1])",
    ]


def test_default_expert_must_exist() -> None:
    assert errors_of(HEAD + """
        experts:
          - {name: a, backend: gpu-0, model: m}
        router:
          strategy: default
          default_expert: b
    """) == ["experts.yaml:8: router.default_expert: unknown expert 'b'"]
    assert parse(HEAD + """
        experts:
          - {name: a, backend: gpu-0, model: m}
        router: {default_expert: a}
    """).router.default_expert == "a"


ROUTER_NAMES = "default, embedding, random, symbolic, two-level"
AGGREGATOR_NAMES = "best, synthesize, vote"


def test_strategies_must_be_registered() -> None:
    # Checked by the loader (coe.config imports neither registry), with the line like any other check.
    assert errors_of(HEAD + """
        router:
          strategy: smart
        pipeline:
          quorum: 0.5
          strategy: median
    """) == [
        f"experts.yaml:5: router.strategy: unknown router 'smart' (known: {ROUTER_NAMES})",
        f"experts.yaml:8: pipeline.strategy: unknown strategy 'median' (known: {AGGREGATOR_NAMES})",
    ]
    assert parse(HEAD + """
        router: {strategy: two-level}
        pipeline: {strategy: vote}
    """).pipeline.strategy == "vote"


def test_strategies_are_checked_when_another_part_is_invalid() -> None:
    assert errors_of(HEAD + """
        router:
          strategy: smart
          k: 3
        pipeline: {strategy: 3}
    """) == [
        f"experts.yaml:5: router.strategy: unknown router 'smart' (known: {ROUTER_NAMES})",
        "experts.yaml:6: router.k: unknown key 'k'",
        "experts.yaml:7: pipeline.strategy: Input should be a valid string",
    ]


def test_model_must_match_the_launch_backends_served_name() -> None:
    assert errors_of("""
        backends:
          local:
            launch: {model: models/tiny}
          named:
            launch:
              model: models/tiny
              served_name: tiny-chat
        experts:
          - {name: a, backend: local, model: tiny}
          - {name: b, backend: local, model: models/tiny}
          - {name: c, backend: named, model: tiny-chat}
          - name: d
            backend: named
            model: tiny
    """) == [
        "experts.yaml:10: experts[1].model: backend 'local' serves 'tiny', not 'models/tiny'",
        "experts.yaml:14: experts[3].model: backend 'named' serves 'tiny-chat', not 'tiny'",
    ]


def test_adapter_needs_a_lora_enabled_launch_backend() -> None:
    assert errors_of("""
        backends:
          local:
            launch:
              model: tiny
              runtime_lora_updating: false
        experts:
          - name: a
            backend: local
            model: tiny
            adapter: {name: sql}
    """) == ["experts.yaml:10: experts[0].adapter: backend 'local' is launched without LoRA support"]


def test_check_expert_and_cross_check_on_a_valid_config() -> None:
    cfg = parse(HEAD_FLAT + "experts:\n  - {name: a, backend: gpu-0, model: m}\n")
    assert cross_check(cfg) == []
    api_expert = ExpertConfig(name="z", backend="nope", model="m")
    assert check_expert(api_expert, cfg) == [(("backend",), "unknown backend 'nope' (known: gpu-0)")]
    assert check_expert(ExpertConfig(name="y", backend="gpu-0", model="anything"), cfg) == []


# -- unknown keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backends: {}\nbackend: {}\n", "experts.yaml:2: backend: unknown key 'backend'"),
        (
            "backends:\n  gpu-0:\n    url: http://x\n    max_concurency: 3\n",
            "experts.yaml:4: backends.gpu-0.max_concurency: unknown key 'max_concurency'",
        ),
        (
            "backends:\n  local:\n    launch:\n      model: tiny\n      portt: 80\n",
            "experts.yaml:5: backends.local.launch.portt: unknown key 'portt'",
        ),
        (
            "backends:\n  gpu-0:\n    url: http://x\n    timeouts:\n      read: 3\n",
            "experts.yaml:5: backends.gpu-0.timeouts.read: unknown key 'read'",
        ),
        (
            "backends:\n  local:\n    launch:\n      model: tiny\n      lora_modules:\n"
            "        - name: a\n          path: p\n          rank: 8\n",
            "experts.yaml:8: backends.local.launch.lora_modules[0].rank: unknown key 'rank'",
        ),
        (
            "backends: {gpu-0: {url: 'http://x'}}\nexperts:\n  - name: a\n    backend: gpu-0\n"
            "    model: m\n    temperature: 0.3\n",
            "experts.yaml:6: experts[0].temperature: unknown key 'temperature'",
        ),
        (
            "backends: {gpu-0: {url: 'http://x'}}\nexperts:\n  - name: a\n    backend: gpu-0\n"
            "    model: m\n    cost:\n      input_per_mtok: 1\n      per_request: 2\n",
            "experts.yaml:8: experts[0].cost.per_request: unknown key 'per_request'",
        ),
        (
            "backends: {gpu-0: {url: 'http://x'}}\nexperts:\n  - name: a\n    backend: gpu-0\n"
            "    model: m\n    adapter:\n      name: sql\n      rank: 8\n",
            "experts.yaml:8: experts[0].adapter.rank: unknown key 'rank'",
        ),
        ("router:\n  strategy: default\n  k: 3\n", "experts.yaml:3: router.k: unknown key 'k'"),
        ("auth:\n  client_auth: false\n  users: []\n", "experts.yaml:3: auth.users: unknown key 'users'"),
        ("pipeline:\n  aggregator: x\n", "experts.yaml:2: pipeline.aggregator: unknown key 'aggregator'"),
        ("store:\n  redis: x\n", "experts.yaml:2: store.redis: unknown key 'redis'"),
        ("dispatch:\n  retry: 1\n", "experts.yaml:2: dispatch.retry: unknown key 'retry'"),
    ],
)
def test_unknown_key(text: str, expected: str) -> None:
    assert errors_of(text) == [expected]


def test_unknown_keys_that_look_like_pydantic_tags_are_reported_as_written() -> None:
    # pydantic puts tags like "function-after[...]" or "int" into error locations; a key
    # the operator wrote must never be mistaken for one.
    assert errors_of(HEAD + """
        experts:
          - name: a
            backend: gpu-0
            model: m
            function-after[x]: 1
            int: 2
            "[key]": 3
    """) == [
        "experts.yaml:8: experts[0].function-after[x]: unknown key 'function-after[x]'",
        "experts.yaml:9: experts[0].int: unknown key 'int'",
        "experts.yaml:10: experts[0].[key]: unknown key '[key]'",
    ]


def test_non_string_keys() -> None:
    assert errors_of(HEAD + """
        experts:
          - name: a
            backend: gpu-0
            model: m
            1: x
        3: y
    """) == [
        "experts.yaml:8: experts[0].1: Keys should be strings",
        "experts.yaml:9: 3: Keys should be strings",
    ]


# -- required fields and types ---------------------------------------------------------


def test_missing_required_fields_point_at_the_item() -> None:
    assert errors_of(HEAD + """
        experts:
          - name: a
            backend: gpu-0
            model: m
          - backend: gpu-0
            model: m
          - name: c
            description: no backend, no model
    """) == [
        "experts.yaml:8: experts[1].name: Field required",
        "experts.yaml:10: experts[2].backend: Field required",
        "experts.yaml:10: experts[2].model: Field required",
    ]


def test_missing_field_in_a_nested_block_points_at_its_key() -> None:
    assert errors_of("""
        backends:
          local:
            launch:
              served_name: x
              lora_modules:
                - name: a
    """) == [
        "experts.yaml:3: backends.local.launch.model: Field required",
        "experts.yaml:6: backends.local.launch.lora_modules[0].path: Field required",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "backends:\n  gpu-0:\n    url: http://x\n    max_concurrency: many\n",
            "experts.yaml:4: backends.gpu-0.max_concurrency: "
            "Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            "backends:\n  gpu-0:\n    url: http://x\n    max_concurrency: 0\n",
            "experts.yaml:4: backends.gpu-0.max_concurrency: Input should be greater than or equal to 1",
        ),
        (
            "backends:\n  local:\n    launch:\n      model: tiny\n      port: 70000\n",
            "experts.yaml:5: backends.local.launch.port: Input should be less than or equal to 65535",
        ),
        (
            "backends:\n  local:\n    launch:\n      model: [a, b]\n",
            "experts.yaml:4: backends.local.launch.model: Input should be a valid path",
        ),
        (
            "backends:\n  local:\n    launch:\n      model: tiny\n      env:\n        PORT: 8000\n",
            "experts.yaml:6: backends.local.launch.env.PORT: Input should be a valid string",
        ),
        ("backends: [gpu-0]\n", "experts.yaml:1: backends: Input should be a valid dictionary"),
        ("backends:\n", "experts.yaml:1: backends: Input should be a valid dictionary"),
        ("experts:\n  name: a\n", "experts.yaml:1: experts: Input should be a valid list"),
        ("experts:\n  - just-a-name\n", "experts.yaml:2: experts[0]: "
         "Input should be a valid dictionary or instance of ExpertConfig"),
        (
            "backends: {gpu-0: {url: 'http://x'}}\nexperts:\n  - name: 123\n    backend: gpu-0\n    model: m\n",
            "experts.yaml:3: experts[0].name: Input should be a valid string",
        ),
        (
            "backends: {gpu-0: {url: 'http://x'}}\nexperts:\n  - name: a\n    backend: gpu-0\n    model: m\n"
            "    skills: chat\n",
            "experts.yaml:6: experts[0].skills: Input should be a valid list",
        ),
        (
            "backends: {gpu-0: {url: 'http://x'}}\nexperts:\n  - name: a\n    backend: gpu-0\n    model: m\n"
            "    tier: best\n",
            "experts.yaml:6: experts[0].tier: Input should be 'standard' or 'strong'",
        ),
        (
            "backends: {gpu-0: {url: 'http://x'}}\nexperts:\n  - name: a\n    backend: gpu-0\n    model: m\n"
            "    cost: {input_per_mtok: -1}\n",
            "experts.yaml:6: experts[0].cost.input_per_mtok: Input should be greater than or equal to 0",
        ),
        (
            "auth:\n  client_auth: maybe\n",
            "experts.yaml:2: auth.client_auth: Input should be a valid boolean, unable to interpret input",
        ),
        ("router:\n  default_expert: [a]\n", "experts.yaml:2: router.default_expert: Input should be a valid string"),
    ],
)
def test_wrong_types(text: str, expected: str) -> None:
    assert errors_of(text) == [expected]


def test_scalar_errors_use_the_line_of_the_key() -> None:
    # Each value sits on the line after its key; the error names the key's line.
    assert errors_of(HEAD + """
        experts:
          - backend: gpu-0
            model: m
            name:
              coe
            tier:
              best
    """) == [
        "experts.yaml:7: experts[0].name: 'coe' is reserved for routed requests",
        "experts.yaml:9: experts[0].tier: Input should be 'standard' or 'strong'",
    ]


# -- names -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "why"), [
    ("coe", "'coe' is reserved for routed requests"),
    # /v1/experts/merge is the merge endpoint: an expert of that name could not be read or removed
    ("merge", "'merge' is reserved: /v1/experts/merge is the admin API's merge endpoint"),
])
def test_reserved_expert_names(name: str, why: str) -> None:
    assert errors_of(HEAD + f"""
        experts:
          - name: {name}
            backend: gpu-0
            model: m
    """) == [f"experts.yaml:5: experts[0].name: {why}"]


@pytest.mark.parametrize(
    "name", ["has space", "-leading-dash", ".hidden", "a/b", "x" * 65, "", "tab\tname", "trailing\n", "ünïcode"]
)
def test_invalid_expert_names(name: str) -> None:
    text = HEAD_FLAT + f"experts:\n  - name: {yaml.safe_dump(name).removesuffix(chr(10) + '...' + chr(10)).strip()}\n"
    text += "    backend: gpu-0\n    model: m\n"
    assert errors_of(text) == [f"experts.yaml:5: experts[0].name: invalid name {name!r}: {NAME_HELP}"]


@pytest.mark.parametrize("name", ["a", "Qwen2.5-7B_instruct:v1", "9lives", "x" * 64])
def test_valid_names(name: str) -> None:
    cfg = parse(HEAD_FLAT + f"experts:\n  - {{name: '{name}', backend: gpu-0, model: m}}\n")
    assert cfg.experts[0].name == name


def test_invalid_names_of_backends_adapters_and_lora_modules() -> None:
    assert errors_of("""
        backends:
          "gpu 0":
            url: http://x
          local:
            launch:
              model: tiny
              lora_modules:
                - {name: "sql lora", path: p}
          "bad/name":
            url: ftp://y
        experts:
          - name: a
            backend: local
            model: tiny
            adapter: {name: "my adapter"}
    """) == [
        f"experts.yaml:2: backends.gpu 0: invalid name 'gpu 0': {NAME_HELP}",
        f"experts.yaml:8: backends.local.launch.lora_modules[0].name: invalid name 'sql lora': {NAME_HELP}",
        f"experts.yaml:9: backends.bad/name: invalid name 'bad/name': {NAME_HELP}",
        "experts.yaml:9: backends.bad/name: url must start with http:// or https://, got 'ftp://y'",
        f"experts.yaml:15: experts[0].adapter.name: invalid name 'my adapter': {NAME_HELP}",
    ]


# -- backends: url xor launch ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("url: http://x\n    launch: {model: tiny}", ONE_KIND),
        ("max_concurrency: 4", ONE_KIND),
        ("url: gpu-0:8000", "url must start with http:// or https://, got 'gpu-0:8000'"),
    ],
)
def test_url_or_launch(body: str, expected: str) -> None:
    assert errors_of(f"backends:\n  gpu-0:\n    {body}\n") == [f"experts.yaml:2: backends.gpu-0: {expected}"]


def test_empty_backend_entry() -> None:
    assert errors_of("backends:\n  gpu-0:\n") == [
        "experts.yaml:2: backends.gpu-0: Input should be a valid dictionary or instance of BackendConfig"
    ]


# -- params ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["model", "messages", "stream"])
def test_params_may_not_set_routing_fields(key: str) -> None:
    assert errors_of(HEAD + f"""
        experts:
          - name: a
            backend: gpu-0
            model: m
            params:
              temperature: 0.1
              {key}: x
    """) == [f"experts.yaml:8: experts[0].params: params may not set {key!r}"]


def test_params_names_every_forbidden_field() -> None:
    assert errors_of(HEAD + """
        experts:
          - {name: a, backend: gpu-0, model: m, params: {stream: true, model: x, top_p: 1}}
    """) == ["experts.yaml:5: experts[0].params: params may not set 'model', 'stream'"]


# -- many errors at once -----------------------------------------------------------------


def test_every_error_in_the_file_is_reported_in_line_order() -> None:
    assert errors_of("""
        backends:
          gpu-0:
            url: http://gpu-0:8000/v1
            bogus: 1
          local:
            launch:
              model: models/tiny
              max_loras: 0
        experts:
          - name: a
            backend: gpu-1
            model: m
          - name: a
            backend: gpu-0
            model: m
            cost: {input_per_mtok: -1, per_call: 2}
          - name: coe
            backend: gpu-0
        router:
          default_expert: nobody
          extra: 1
    """) == [
        "experts.yaml:4: backends.gpu-0.bogus: unknown key 'bogus'",
        "experts.yaml:8: backends.local.launch.max_loras: Input should be greater than or equal to 1",
        "experts.yaml:11: experts[0].backend: unknown backend 'gpu-1' (known: gpu-0, local)",
        "experts.yaml:13: experts[1].name: duplicate expert name 'a' (also experts[0])",
        "experts.yaml:16: experts[1].cost.input_per_mtok: Input should be greater than or equal to 0",
        "experts.yaml:16: experts[1].cost.per_call: unknown key 'per_call'",
        "experts.yaml:17: experts[2].name: 'coe' is reserved for routed requests",
        "experts.yaml:17: experts[2].model: Field required",
        "experts.yaml:20: router.default_expert: unknown expert 'nobody'",
        "experts.yaml:21: router.extra: unknown key 'extra'",
    ]


def test_reference_checks_still_run_when_another_part_is_invalid() -> None:
    # experts[1] is invalid on its own; experts[0]'s bad reference and the model mismatch
    # of experts[2] are still reported. experts[3] names an invalid backend: only the
    # backend's own error is reported, not a spurious "unknown backend".
    assert errors_of("""
        backends:
          local:
            launch: {model: tiny}
          broken:
            url: ftp://x
        experts:
          - {name: a, backend: nope, model: tiny}
          - {name: b, backend: local, model: tiny, tier: 3}
          - {name: c, backend: local, model: big}
          - {name: d, backend: broken, model: m}
        router: {default_expert: b}
    """) == [
        "experts.yaml:4: backends.broken: url must start with http:// or https://, got 'ftp://x'",
        "experts.yaml:7: experts[0].backend: unknown backend 'nope' (known: broken, local)",
        "experts.yaml:8: experts[1].tier: Input should be 'standard' or 'strong'",
        "experts.yaml:9: experts[2].model: backend 'local' serves 'tiny', not 'big'",
    ]


def test_an_invalid_backends_section_causes_no_reference_noise() -> None:
    assert errors_of("""
        backends: [gpu-0]
        experts:
          - {name: a, backend: gpu-0, model: m}
          - {name: a, backend: gpu-0, model: m}
        router: {default_expert: z}
    """) == [
        "experts.yaml:1: backends: Input should be a valid dictionary",
        "experts.yaml:4: experts[1].name: duplicate expert name 'a' (also experts[0])",
        "experts.yaml:5: router.default_expert: unknown expert 'z'",
    ]


# -- YAML itself ------------------------------------------------------------------------


def test_duplicate_yaml_keys_are_errors() -> None:
    assert errors_of(HEAD + """
          local:
            launch: {model: tiny}
          gpu-0:
            url: http://other:8000/v1
        experts:
          - {name: a, backend: gpu-0, model: m, model: n}
    """) == [
        "experts.yaml:6: backends.gpu-0: duplicate key 'gpu-0' (first on line 2)",
        "experts.yaml:9: experts[0].model: duplicate key 'model' (first on line 9)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "backends:\n  gpu-0:\n    url: http: //x: y\n",
            "experts.yaml:3: invalid YAML: mapping values are not allowed here",
        ),
        (
            "backends:\n  gpu-0:\n    url: http://x\n  - oops\n",
            "experts.yaml:4: invalid YAML: expected <block end>, but found '-' "
            "(while parsing a block mapping on line 2)",
        ),
        (
            "experts: [a, b\n",
            "experts.yaml:2: invalid YAML: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence on line 1)",
        ),
        (
            "backends:\n\tgpu-0: {}\n",
            "experts.yaml:2: invalid YAML: found character '\\t' that cannot start any token "
            "(while scanning for the next token)",
        ),
        ("backends: {}\n---\nexperts: []\n", "experts.yaml:2: invalid YAML: but found another document "
         "(expected a single document in the stream on line 1)"),
        ("experts: *missing\n", "experts.yaml:1: invalid YAML: found undefined alias 'missing'"),
        (
            "backends: !!python/object:os.system {}\n",
            "experts.yaml:1: invalid YAML: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object:os.system'",
        ),
        ("? [a, b]\n: 1\n", "experts.yaml:1: invalid YAML: found unhashable key "
         "(while constructing a mapping on line 1)"),
    ],
)
def test_invalid_yaml(text: str, expected: str) -> None:
    assert errors_of(text) == [expected]


@pytest.mark.parametrize(
    ("text", "line", "kind"),
    [
        ("- name: a\n  backend: gpu-0\n", 1, "list"),
        ("# the registry\n\n- a\n", 3, "list"),
        ("just a string\n", 1, "str"),
        ("42\n", 1, "int"),
    ],
)
def test_top_level_must_be_a_mapping(text: str, line: int, kind: str) -> None:
    assert errors_of(text) == [
        f"experts.yaml:{line}: the file must be a mapping with keys like 'backends' and 'experts', not a {kind}"
    ]


def test_error_in_a_merged_anchor_points_at_the_anchor() -> None:
    assert errors_of(HEAD + """
        experts:
          - &base
            name: a
            backend: gpu-0
            model: m
            colour: red
          - <<: *base
            name: b
    """) == [
        "experts.yaml:9: experts[0].colour: unknown key 'colour'",
        "experts.yaml:9: experts[1].colour: unknown key 'colour'",
    ]


# -- reading the file --------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert info.value.errors == [f"{path}: cannot read: No such file or directory"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_registry(tmp_path)
    assert info.value.errors == [f"{tmp_path}: cannot read: Is a directory"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "backends: {}\n")
    path.chmod(0)
    try:
        with pytest.raises(ConfigError) as info:
            load_registry(path)
    finally:
        path.chmod(0o644)
    assert info.value.errors == [f"{path}: cannot read: Permission denied"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "experts.yaml"
    path.write_bytes(b"backends: {}\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert info.value.errors == [f"{path}: cannot read: not UTF-8 text (invalid continuation byte at byte 18)"]


def test_errors_name_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "router: {k: 1}\n", name="reg.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_registry("reg.yaml")
    assert info.value.errors == ["reg.yaml:1: router.k: unknown key 'k'"]


# -- the pieces: locations and lines -----------------------------------------------------


def test_format_loc() -> None:
    assert format_loc(("experts", 2, "backend")) == "experts[2].backend"
    assert format_loc(("backends", "gpu-0", "launch", "lora_modules", 0, "name")) == (
        "backends.gpu-0.launch.lora_modules[0].name"
    )
    assert format_loc(()) == "(top level)"


def _check_word(value: str) -> str:
    if " " in value:
        raise ValueError("no spaces")
    return value


Word = Annotated[str, AfterValidator(_check_word)]


class Tagged(BaseModel):
    """A model whose errors carry pydantic's schema tags in ``loc``."""

    choice: int | Word = 0
    table: dict[Word, int] = {}
    items: list[int | Word] = []


def test_clean_loc_drops_pydantic_tags() -> None:
    data: dict[str, Any] = {"choice": "a b", "table": {"x y": 1}, "items": [1, "c d"]}
    with pytest.raises(ValidationError) as info:
        Tagged.model_validate(data)
    raw = [err["loc"] for err in info.value.errors()]
    assert ("choice", "function-after[_check_word(), str]") in raw  # what pydantic really writes
    assert ("table", "x y", "[key]") in raw
    problems = validation_problems(info.value, data)
    assert problems == [
        (["choice"], "Input should be a valid integer, unable to parse string as an integer"),
        (["choice"], "no spaces"),
        (["table", "x y"], "no spaces"),
        (["items", 1], "Input should be a valid integer, unable to parse string as an integer"),
        (["items", 1], "no spaces"),
    ]
    assert [format_loc(loc) for loc, _ in problems] == ["choice", "choice", "table.x y", "items[1]", "items[1]"]


def test_clean_loc_keeps_keys_that_are_in_the_data() -> None:
    data = {"a": {"function-after[x]": {"int": 1}}, "l": [{"3": 0}], "m": {4: "v"}}
    assert clean_loc(("a", "function-after[x]", "int"), data) == ["a", "function-after[x]", "int"]
    assert clean_loc(("a", "function-after[f(), str]", "function-after[x]"), data) == ["a", "function-after[x]"]
    assert clean_loc(("l", 0, "3"), data) == ["l", 0, "3"]
    assert clean_loc(("m", 4, "[key]"), data) == ["m", "4"]
    # A missing field is the last part and is not in the data: it stays.
    assert clean_loc(("l", 0, "model"), data, missing=True) == ["l", 0, "model"]
    assert clean_loc(("l", 0, "str"), data) == ["l", 0]
    assert clean_loc(("l", 5, "name"), data, missing=True) == ["l", 5, "name"]


LINES_DOC = """\
backends:
  gpu-0:
    url:
      http://x
    timeouts:
      read_s: 3
experts:
  - name: a
    skills:
      - chat
      - code
  -
    name: b
"""


@pytest.mark.parametrize(
    ("loc", "line"),
    [
        ((), 1),
        (("backends",), 1),
        (("backends", "gpu-0"), 2),
        (("backends", "gpu-0", "url"), 3),  # the key's line, not the value's (4)
        (("backends", "gpu-0", "timeouts"), 5),  # a block value: still its key
        (("backends", "gpu-0", "timeouts", "read_s"), 6),
        (("backends", "gpu-0", "timeouts", "connect_s"), 5),  # missing: the enclosing key
        (("backends", "gpu-0", "launch", "model"), 2),  # missing several deep
        (("backends", "gpu-1"), 1),
        (("experts", 0), 8),
        (("experts", 0, "model"), 8),  # missing field of an item: the item's line
        (("experts", 0, "skills", 1), 11),
        (("experts", 1), 13),
        (("experts", 1, "name"), 13),
        (("experts", 7, "name"), 7),  # no such item: the list's key
        (("router", "default_expert"), 1),
    ],
)
def test_line_of(loc: tuple[str | int, ...], line: int) -> None:
    root = yaml.compose(LINES_DOC, Loader=yaml.SafeLoader)
    assert _line_of(root, loc) == line


def test_line_of_without_a_document() -> None:
    assert _line_of(None, ("experts",)) is None
