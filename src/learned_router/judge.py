"""The judge's rubric for `learned-router label`: MT-Bench's prompts, and how a verdict becomes a grade in [0, 1].

The prompts are MT-Bench's (Zheng et al. 2023, "Judging LLM-as-a-judge with MT-Bench and Chatbot Arena"; the
`single-v1`, `single-math-v1` and `pair-v2` prompts of FastChat's llm_judge, Apache-2.0), for one-turn prompts. The
models compared are listed cheapest first; the last one, the strongest, gives the reference answer.

Single mode (`judge.mode: single`): single-answer grading with a reference. The judge reads the question, the
strongest model's answer as the reference and the answer graded, and ends with "Rating: [[5]]"; the rating, 1 to 10,
is found with the regex `\\[\\[(\\d+\\.?\\d*)\\]\\]` and becomes the grade (rating - 1) / 9. The strongest model's own
answer is graded without a reference (MT-Bench's `single-v1` prompt): against itself it would say nothing. One judge
call per (prompt, model); the rows are absolute grades.

Pairwise mode (`judge.mode: pairwise`): each model's answer against the strongest model's (the baseline), with
MT-Bench's pairwise prompt, whose verdict is "[[A]]" (assistant A is better), "[[B]]" or "[[C]]" (a tie). Each pair
is judged twice, the candidate first as assistant A and then as assistant B, to cancel the judge's position bias; the
grade is the mean of the two verdicts from the candidate's side (a win 1, a tie 0.5, a loss 0), so 0, 0.25, 0.5, 0.75
or 1. The strongest model gets no pairwise row: it is the baseline. The rows are grades versus the baseline (they
carry a `baseline` column, which makes training read them as a 'versus' source).

Nothing is guessed: a judge answer with no verdict, a rating outside 1-10, or several verdicts that disagree is
unparseable, and its row is not written (a rerun asks again).
"""

from __future__ import annotations

import re

RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
VERDICT = re.compile(r"\[\[([ABC])\]\]")
NO_ANSWER = "I cannot answer that."  # what the fake provider's `fail_words` make it say (tests, demo)

SINGLE_SYSTEM = "You are a helpful assistant."
_RATE = (
    "After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following "
    'this format: "[[rating]]", for example: "Rating: [[5]]".'
)
SINGLE = (  # MT-Bench single-v1: no reference (the strongest model's own answer)
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a "
    f"short explanation. Be as objective as possible. {_RATE}\n\n"
    "[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
SINGLE_REFERENCE = (  # MT-Bench single-math-v1: graded against the reference answer
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider correctness and helpfulness. You "
    "will be given a reference answer and the assistant's answer. Begin your evaluation by comparing the assistant's "
    "answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. "
    f"{_RATE}\n\n"
    "[Question]\n{question}\n\n"
    "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
PAIRWISE_SYSTEM = (  # MT-Bench pair-v2
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. You should choose the assistant that follows the user's instructions and answers "
    "the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by comparing the two "
    "responses and provide a short explanation. Avoid any positional biases and ensure that the order in which the "
    "responses were presented does not influence your decision. Do not allow the length of the responses to influence "
    "your evaluation. Do not favor certain names of the assistants. Be as objective as possible. After providing your "
    'explanation, output your final verdict by strictly following this format: "[[A]]" if assistant A is better, '
    '"[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
PAIRWISE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
WIN = {"A": 1.0, "C": 0.5, "B": 0.0}  # assistant A's share of a verdict


def single_messages(question: str, answer: str, reference: str | None = None) -> list[dict]:
    """The judge's chat for one answer: with the strongest model's answer as `reference`, or none (its own answer)."""
    if reference is None:
        text = SINGLE.format(question=question, answer=answer)
    else:
        text = SINGLE_REFERENCE.format(question=question, reference=reference, answer=answer)
    return [{"role": "system", "content": SINGLE_SYSTEM}, {"role": "user", "content": text}]


def pairwise_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    """The judge's chat for two answers, `answer_a` shown first."""
    return [
        {"role": "system", "content": PAIRWISE_SYSTEM},
        {"role": "user", "content": PAIRWISE.format(question=question, answer_a=answer_a, answer_b=answer_b)},
    ]


def parse_rating(text: str) -> float | None:
    """The rating's grade (rating - 1) / 9; None when there is no [[rating]], one outside 1-10, or two that differ."""
    found = {float(m) for m in RATING.findall(text or "")}
    if len(found) != 1:
        return None
    rating = found.pop()
    return (rating - 1) / 9 if 1 <= rating <= 10 else None


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (a tie); None when there is no [[A]]/[[B]]/[[C]], or two different ones."""
    found = set(VERDICT.findall(text or ""))
    return found.pop() if len(found) == 1 else None


def pairwise_grade(candidate_first: str, candidate_second: str) -> float:
    """The candidate's grade from the verdicts with it as assistant A, then as assistant B: the mean of its shares."""
    return (WIN[candidate_first] + 1.0 - WIN[candidate_second]) / 2


def judge_chat(mode: str, prompt: str, answers: list[str]) -> list[dict]:
    """The judge's chat grading answers[0], against answers[1] (the strongest's) when there is one."""
    if mode == "single":
        return single_messages(prompt, answers[0], answers[1] if len(answers) > 1 else None)
    return pairwise_messages(prompt, *answers)
