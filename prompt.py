"""The self-check prompt of R2Rank (Sec. 3.4, Fig. 2 of the paper): one chat per (user, candidate).

    self_check_messages(instance, k)  -> [system, user] chat messages about candidate k
    self_check_parts(instance, k)     -> (system, prefix shared by all K candidates, candidate text)
    parse_answer(text)                -> 1 Recommend / 0 Not Recommend / None
    encode_user(tokenizer, instance)  -> token ids: (prefix shared by the K prompts, [suffix_k])

Length budget: every item is one line "title - text" cut to max_item_chars characters (default 200,
"..." marks a cut), the profile is cut likewise, and the history keeps its most recent max_history
items (default 20), oldest first. At the defaults a prompt stays under ~5,000 characters. Timestamps
are left out, to keep prompts short.
"""
import re

from data import shorten

RECOMMEND = "Recommend"
NOT_RECOMMEND = "Not Recommend"

SYSTEM_PROMPT = "You are a recommendation assistant. You judge one candidate item at a time for one user."
INSTRUCTIONS = (
    "Decide whether to recommend the candidate item below to this user. "
    "Answer in three parts, in this order.\n"
    "# Initial reasoning: weigh what the user context says about this user's tastes against what the "
    "candidate item offers.\n"
    "# Self-check: re-read your initial reasoning and look for errors, claims the context does not "
    "support, doubts, and signals you leaned on too heavily.\n"
    "# Final conclusion: state the deciding reasons in a few sentences.\n"
    f"End with exactly one of <answer>{RECOMMEND}</answer> or <answer>{NOT_RECOMMEND}</answer>.")
ANSWER_PATTERN = re.compile(r"<answer>\s*(not\s+recommend|recommend)\s*</answer>", re.IGNORECASE)


def candidate_text(candidate, max_item_chars=200):
    """One item as one line, "title - text", cut to max_item_chars."""
    line = f"{candidate['title']} - {candidate['text']}" if candidate.get("text") else candidate["title"]
    return shorten(" ".join(line.split()), max_item_chars)


def user_context_text(instance, max_history=20, max_item_chars=200):
    """The profile and the numbered history, oldest first, cut to its most recent max_history items."""
    history = instance["history"][-max_history:] if max_history > 0 else []
    lines = [f"Profile: {shorten(instance.get('profile') or 'not available', max_item_chars)}",
             "History, oldest first:" if history else "History: none"]
    lines += [f"{number}. {candidate_text(item, max_item_chars)}" for number, item in enumerate(history, 1)]
    return "\n".join(lines)


def self_check_parts(instance, k, max_history=20, max_item_chars=200):
    """(system text, user-message prefix shared by all K candidates, candidate k's text). The prefix
    ends with a newline, so tokenizers split there and its KV cache can serve all K candidates."""
    context = user_context_text(instance, max_history, max_item_chars)
    prefix = f"{INSTRUCTIONS}\n\nUSER CONTEXT\n{context}\n\nCANDIDATE ITEM\n"
    return SYSTEM_PROMPT, prefix, candidate_text(instance["candidates"][k], max_item_chars)


def self_check_messages(instance, k, max_history=20, max_item_chars=200):
    """Chat messages asking for the self-check reasoning about candidate k (Fig. 2 of the paper)."""
    system, prefix, candidate = self_check_parts(instance, k, max_history, max_item_chars)
    return [{"role": "system", "content": system}, {"role": "user", "content": prefix + candidate}]


def parse_answer(text):
    """1 if the last <answer> tag says Recommend, 0 if it says Not Recommend, None if there is none."""
    answers = ANSWER_PATTERN.findall(text)
    return int(not answers[-1].lower().startswith("not")) if answers else None



def encode_user(tokenizer, instance, max_history=20, max_item_chars=200, response_prefix=""):
    """Token ids of the prompt prefix shared by the user's K candidates, and of each candidate's suffix.

    Prompt k is the chat template of self_check_messages(instance, k) with the assistant turn opened,
    followed by response_prefix (text every reply is forced to start with; empty by default). It is
    always prefix + suffix_k (tokenized separately, also when nothing is shared), so the shared-prefix
    rollout and the update see exactly the same tokens.
    """
    texts = [tokenizer.apply_chat_template(self_check_messages(instance, k, max_history, max_item_chars),
                                           tokenize=False, add_generation_prompt=True) + response_prefix
             for k in range(len(instance["candidates"]))]
    _, shared, _ = self_check_parts(instance, 0, max_history, max_item_chars)
    cut = texts[0].index(shared) + len(shared)  # the prefix ends after the shared part of the user message
    assert all(text[:cut] == texts[0][:cut] for text in texts)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode(texts[0][:cut]), [encode(text[cut:]) for text in texts]
