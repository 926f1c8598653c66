from hybrid_serve.agents.citations import finalize, markers, support
from hybrid_serve.schemas import Passage


def passage(i: int, text: str, doc: str | None = None) -> Passage:
    return Passage(
        chunk_id=f"{doc or 'd' + str(i)}#{i}",
        doc_id=doc or f"d{i}",
        title=f"T{i}",
        text=text,
        score=1.0 / i,
    )


PASSAGES = [
    passage(1, "Paris is the capital of France."),
    passage(2, "The Seine flows through Paris and into the English Channel."),
    passage(3, "Berlin is the capital of Germany."),
]


def test_markers_parse_lists_and_adjacent():
    assert markers("a [1] b [2, 3][4]") == [1, 2, 3, 4]


def test_renumber_in_order_of_first_use():
    text, cites = finalize("Berlin is German [3]. Paris is French [1]. Again [3].", PASSAGES)
    assert text == "Berlin is German [1]. Paris is French [2]. Again [1]."
    assert [c.doc_id for c in cites] == ["d3", "d1"]
    assert [c.number for c in cites] == [1, 2]


def test_dangling_numbers_are_removed():
    text, cites = finalize("Paris is the capital of France [7].", PASSAGES, attribute_uncited=False)
    assert "[7]" not in text and cites == []
    text, cites = finalize("Paris [1][9].", PASSAGES)
    assert text == "Paris [1]." and len(cites) == 1


def test_every_marker_has_an_entry():
    text, cites = finalize("A [2]. B [2, 1]. C [0]. D [3].", PASSAGES)
    numbers = {c.number for c in cites}
    assert set(markers(text)) == numbers
    assert numbers == set(range(1, len(cites) + 1))


def test_uncited_supported_sentence_is_attributed():
    text, cites = finalize("The Seine flows through Paris.", PASSAGES)
    assert text == "The Seine flows through Paris [1]."
    assert cites[0].doc_id == "d2"


def test_unsupported_sentence_stays_uncited():
    text, cites = finalize("Quantum chromodynamics explains gluons.", PASSAGES)
    assert cites == [] and "[" not in text


def test_same_chunk_cited_twice_is_one_citation():
    dup = [PASSAGES[0], PASSAGES[0]]
    text, cites = finalize("Paris [1]. Capital [2].", dup)
    assert len(cites) == 1 and text == "Paris [1]. Capital [1]."


def test_snippet_is_the_supporting_sentence():
    long = passage(1, "Unrelated opening. The tower is 330 metres tall. Another thing.")
    _, cites = finalize("The tower is 330 metres tall [1].", [long])
    assert cites[0].snippet == "The tower is 330 metres tall."


def test_support():
    assert support("Paris capital France", "Paris is the capital of France.") == 1.0
    assert support("Berlin", "Paris") == 0.0
    assert support("the of", "anything") == 0.0


def test_as_numbered_keeps_the_models_numbers():
    from hybrid_serve.agents.citations import as_numbered

    cites = as_numbered("Berlin is German [3]. Paris [1, 9]. Again [3].", PASSAGES)
    assert [(c.number, c.doc_id) for c in cites] == [(3, "d3"), (1, "d1")]
    assert cites[0].snippet == "Berlin is the capital of Germany."


def test_abbreviations_and_initials_stay_inside_their_sentence():
    passages = [
        Passage(
            chunk_id="f#0",
            doc_id="f",
            title="Film",
            text="L.A. Confidential is a 1997 film scored by Jerry Goldsmith.",
            score=1.0,
        )
    ]
    text, cites = finalize("The film is L.A. Confidential, scored by Jerry Goldsmith.", passages)
    assert text == "The film is L.A. Confidential, scored by Jerry Goldsmith [1]."
    assert len(cites) == 1
