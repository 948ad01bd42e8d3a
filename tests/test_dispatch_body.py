"""How a client's body is shaped for one expert (no network)."""

from __future__ import annotations

from coe.config import ExpertConfig
from coe.dispatch.body import upstream_body

MSG = [{"role": "user", "content": "hi"}]


def expert(**kw: object) -> ExpertConfig:
    return ExpertConfig.model_validate({"name": "e", "backend": "b", "model": "base", **kw})


def test_client_values_win_over_expert_defaults() -> None:
    out = upstream_body(expert(params={"temperature": 0.1, "max_tokens": 50}), {"messages": MSG, "temperature": 0.9})
    assert out["temperature"] == 0.9 and out["max_tokens"] == 50 and out["model"] == "base"
    assert out["stream"] is False


def test_adapter_expert_names_its_adapter() -> None:
    out = upstream_body(expert(adapter={"name": "sql"}), {"messages": MSG}, base_adapter="base-coe-base")
    assert out["model"] == "sql"


def test_base_expert_goes_through_zero_adapter_when_the_backend_has_one() -> None:
    assert upstream_body(expert(), {"messages": MSG}, base_adapter="base-coe-base")["model"] == "base-coe-base"
    assert upstream_body(expert(), {"messages": MSG})["model"] == "base"


def test_system_prompt_merges_into_one_system_message() -> None:
    e = expert(system_prompt="You are e.")
    assert upstream_body(e, {"messages": MSG})["messages"] == [{"role": "system", "content": "You are e."}, *MSG]
    merged = upstream_body(e, {"messages": [{"role": "system", "content": "Be brief."}, *MSG]})["messages"]
    assert merged == [{"role": "system", "content": "You are e.\n\nBe brief."}, *MSG]


def test_streams_always_ask_for_usage_and_coe_options_stay_home() -> None:
    out = upstream_body(expert(), {"messages": MSG, "coe": {"experts": ["x"]}, "stream_options": {"foo": 1}},
                        stream=True)
    assert out["stream_options"] == {"foo": 1, "include_usage": True}
    assert "coe" not in out
    assert "stream_options" not in upstream_body(expert(), {"messages": MSG, "stream_options": {"include_usage": True}})
