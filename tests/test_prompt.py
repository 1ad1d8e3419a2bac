"""What the AI is sent (ai.build_prompt): the conversation, then the burst, with every reply we
sent since its first text placed among its texts (a reply by hand is never ignored)."""

from conftest import T0, add, invoke, real_processor
from fakes import provider_env
from smsbatch.ai import ANSWERED_BY_HAND, budget_note, build_prompt

A, US = "+15554440001", "+15550000000"


def text(body, at):
    return {"body": body, "media": None, "received_at": at}


def test_a_burst_alone_and_the_conversation_before_it():
    history = [(T0 - 60, "user", "hi", None, None), (T0 - 50, "assistant", "hello!", None, "ai")]
    assert build_prompt("be kind", history, [text("one", T0), text("two", T0 + 1)]) == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "(The customer sent 2 texts in a row; answer them together.)\n1. one\n2. two"}]


def test_a_reply_by_hand_in_the_middle_of_the_burst_takes_its_place():
    history = [(T0 + 2, "assistant", "it ships Monday (ops)", None, "manual")]
    texts = [text("is my order late?", T0), text("order 42", T0 + 1), text("and can I pay by card?", T0 + 5)]
    assert build_prompt("p", history, texts)[1:] == [
        {"role": "user", "content": "(The customer sent 2 texts in a row.)\n1. is my order late?\n2. order 42"},
        {"role": "assistant", "content": "it ships Monday (ops)"},
        {"role": "user", "content": "and can I pay by card?"}]


def test_when_our_reply_is_the_last_word_the_ai_is_told_so():
    texts = [text("is my order late?", T0)]
    by_hand = build_prompt("p", [(T0 + 3, "assistant", "it ships Monday", None, "manual")], texts)
    assert by_hand[-2:] == [{"role": "assistant", "content": "it ships Monday"},
                            {"role": "system", "content": ANSWERED_BY_HAND}]
    assert "by hand" in ANSWERED_BY_HAND and "only what is still open" in ANSWERED_BY_HAND


def test_an_ai_reply_sent_during_the_burst_answered_an_earlier_batch_and_goes_before_it():
    """The AI's reply to the batch before (in flight while these texts came) never saw them."""
    history = [(T0 - 5, "user", "first question", None, None),
               (T0 + 3, "assistant", "answer to the first question", None, "ai")]
    assert build_prompt("p", history, [text("second question", T0)])[1:] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "answer to the first question"},
        {"role": "user", "content": "second question"}]


def test_the_ai_sees_a_reply_sent_by_hand_after_the_batch_began(db_path, store, clock, openai_standin,
                                                                 twilio_standin):
    env = provider_env(openai_standin, twilio_standin, SMSBATCH_DB=db_path, SMSBATCH_AI_CLIENT_RETRIES=0)
    add(store, A, "is my order late?", T0, to=US)
    result = invoke(["send", A, "Yes, sorry - it ships Monday (ops)", "--now", str(T0 + 3)], env)
    assert result.exit_code == 0, result.output
    add(store, A, "ok and the invoice?", T0 + 4, to=US)
    invoke(["send", A, "invoice attached to your email (ops)", "--now", str(T0 + 6)], env)
    from smsbatch.config import Settings

    clock.now = T0 + 20
    real_processor(Settings.from_env(env), clock).run()
    assert openai_standin.calls[-1][1] == {"role": "system", "content": budget_note(3)}
    assert openai_standin.calls[-1][2:] == [
        {"role": "user", "content": "is my order late?"},
        {"role": "assistant", "content": "Yes, sorry - it ships Monday (ops)"},
        {"role": "user", "content": "ok and the invoice?"},
        {"role": "assistant", "content": "invoice attached to your email (ops)"},
        {"role": "system", "content": ANSWERED_BY_HAND}]


def test_the_reply_budget_follows_the_system_prompt():
    messages = build_prompt("be kind", [], [text("hi", T0)], budget_note(2))
    assert messages[:2] == [{"role": "system", "content": "be kind"}, {"role": "system", "content": budget_note(2)}]
    assert "2 text messages: at most 306 characters, or 134 if it uses emoji" in budget_note(2)
    assert "one text message: at most 160 characters, or 70" in budget_note(1)
