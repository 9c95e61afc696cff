"""Synthetic English text for workloads where the tokenizer matters (text and chat prompts).

Prompts are words drawn from a fixed list of common English words. With the leading space each of
these is a single token for byte-level BPE tokenizers like SmolLM2's, Llama's or GPT-2's, so a
prompt of N words is about N tokens; the metrics use the prompt length the server reports, never
this estimate. The list is part of the code, so the same seed makes the same text everywhere.
"""

from __future__ import annotations

import numpy as np

WORDS = tuple(
    dict.fromkeys(
        """
    the of and to in is was for on that with as by at from his her it an be are this which or had
    not but were they have one their you all we can has been there more when who will would so no
    if out up what about into than them its only new time some could these two may then do first
    any my now such like other our how over also after back well many where most through made long
    way even good just those see years people work great should world still between own last being
    life under day same year another while might know much city part down state both each before
    used around little place old three small found however large going since during without again
    home number along must four great right high school house every group name water until against
    set line early public often family light later point five book story end order power change
    young next land river car road field money music word night side game week food air body word
    fire sea sun tree room door hand head face eye voice mind heart love friend child woman man king
    war team art form plan idea study class level course price market company report table paper
    south north east west open close keep turn show help call move play run walk talk read write
    learn teach grow build begin start stop hold bring carry give take make look find think feel
    """.split()
    )
)


def random_words(rng: np.random.Generator, num_words: int) -> str:
    """`num_words` words, space-separated, the first capitalised. Advances rng."""
    picks = rng.integers(0, len(WORDS), size=num_words)
    words = [WORDS[i] for i in picks.tolist()]
    if words:
        words[0] = words[0].capitalize()
    return " ".join(words)
