"""Small talk: greetings, thanks, help, and "undo"."""

from __future__ import annotations

import re

from agent_service.builtin_model.meaning import Clause, Intent

_GREETING = re.compile(
    r"^(?:hi|hello|hey|hiya|howdy|yo|sup|what's up|whats up|good (?:morning|afternoon|evening|day)|greetings|hey there|hi there|hello there|how are you(?: doing)?|how's it going)\b",
    re.I,
)
_THANKS = re.compile(
    r"^(?:thanks|thank you|thx|ty|cheers|much appreciated|appreciate it|great|awesome|cool|perfect|nice|ok|okay|"
    r"got it|good|great job|well done|sounds good|that's all|that is all|all done|bye|goodbye|see you|no thanks|"
    r"nothing|never ?mind|nope|no|yes|yep|sure|fine|wonderful|amazing|excellent|lovely)\b",
    re.I,
)
_HELP = re.compile(
    r"\b(?:help|what can you do|what do you do|how do(?:es)? (?:this|you|i use)|who are you|what are you|"
    r"what is this|how does this work|what are your (?:features|capabilities|commands)|commands|instructions|"
    r"how (?:can|do) i use|what can i (?:say|ask|do)|capabilities|usage)\b",
    re.I,
)


# "undo", "oops, bring it back", "that was a mistake": take back the last change.
_UNDO = re.compile(
    r"^(?:(?:undo|revert|roll back|rollback|reverse|take (?:that|it) back|put (?:it|that|them) back|bring (?:it|that|them) back|"
    r"get (?:it|that) back|restore (?:it|that|them))(?:\s+(?:that|it|this|the last (?:change|action|one|thing)|my last (?:change|action)|"
    r"what you (?:just )?did|the last thing you did|please|again|now|for me))*|"
    r"(?:i )?didn'?t mean (?:to do )?(?:that|it)|that was a mistake|my mistake|go back|cancel (?:that|the last change))$",
    re.I,
)


def read_chat(clause: Clause) -> Intent | None:
    text = clause.text
    if _UNDO.match(text):
        return Intent("undo", text=text)
    if _HELP.search(text):
        return Intent("help", text=text)
    if _GREETING.match(text) and len(text.split()) <= 6:
        return Intent("greet", text=text)
    if _THANKS.match(text) and len(text.split()) <= 6:
        return Intent("thanks", text=text)
    return None
