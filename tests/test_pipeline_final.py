"""``coe.pipeline.final``: the final stage's record, trace step and state merge, shared by the graph's
``answer`` node and the streamed final stage."""

from __future__ import annotations

from coe.dispatch import ExpertCall
from coe.pipeline import State
from coe.pipeline import final as final_stage
from coe.pipeline.state import CallRecord


def test_merge_appends_where_the_graph_appends_and_replaces_elsewhere() -> None:
    state: State = {"calls": [CallRecord("a", "expert", 1, "ok")], "trace": [{"step": "classify"}],
                    "answered_by": "x", "round": 1}
    merged = final_stage.merge(state, {"calls": [CallRecord("b", "aggregator", 1, "ok")],
                                       "trace": [{"step": "answer"}], "answered_by": "b", "round": 2})
    assert [c.name for c in merged["calls"]] == ["a", "b"]
    assert [s["step"] for s in merged["trace"]] == ["classify", "answer"]
    assert merged["answered_by"] == "b" and merged["round"] == 2
    assert [c.name for c in state["calls"]] == ["a"], "the input state is not changed"


def test_streamed_and_whole_answers_record_the_same_call() -> None:
    state: State = {"answers": [], "round": 0}
    call = ExpertCall("agg", usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, cost=0.5,
                      latency_ms=12.0, skipped=["down"])
    whole, streamed = final_stage.answered(state, call), final_stage.answered(state, call, streamed=True)
    assert whole["calls"] == streamed["calls"]
    assert whole["calls"][0].role == "final" and whole["calls"][0].round == 1
    assert streamed["trace"] == [{**whole["trace"][0], "streamed": True}]
    assert whole["trace"][0]["skipped"] == ["down"]


def test_the_plans_stop_is_added_to_the_clients() -> None:
    from coe.aggregate import FinalCall
    from coe.config import ExpertConfig

    experts = {"agg": ExpertConfig(name="agg", backend="b", model="m")}
    plan = FinalCall(["agg", "gone"], [{"role": "user", "content": "q"}], "why", params={"stop": ["</answer>"]})
    chosen, body = final_stage.request({}, plan, {"stop": "END", "temperature": 0}, experts)
    assert [e.name for e in chosen] == ["agg"]
    assert body["stop"] == ["END", "</answer>"] and body["temperature"] == 0 and body["messages"] == plan.messages
    _, alone = final_stage.request({}, plan, {}, experts)
    assert alone["stop"] == ["</answer>"]
