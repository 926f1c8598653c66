from hybrid_serve.text import Evidence, claims, sentence_spans, split_sentences


def test_sentences_keep_abbreviations_initials_and_decimals():
    text = (
        "The film is L.A. Confidential [1]. J. R. R. Tolkien wrote it. Rates rose 3.5% in the U.S."
    )
    assert split_sentences(text) == [
        "The film is L.A. Confidential [1].",
        "J. R. R. Tolkien wrote it.",
        "Rates rose 3.5% in the U.S.",
    ]
    assert [text[a:b] for a, b in sentence_spans(text)] == split_sentences(text)
    assert split_sentences("First paragraph\n\nSecond one.") == ["First paragraph", "Second one."]


def test_claims_are_names_and_numbers_a_sentence_asserts():
    found = claims("The Zorblax protocol was invented by Mira Quen in 1987 in Tallinn, Turkey.")
    assert [c.text for c in found] == ["Zorblax", "Mira Quen", "Tallinn", "Turkey", "1987"]
    # A capitalised word opening a sentence may be a name or not: its stem must be in evidence.
    assert [(c.text, c.kind) for c in claims("Founded in 1,200 BC.")][0] == ("Founded", "opening")
    assert Evidence.of("It was founded then.").supports(claims("Founded.")[0])
    assert not Evidence.of("It was founded then.").supports(claims("Tallinn [1].")[0])
    assert [c.text for c in claims("Leonardo da Vinci painted it.")] == ["Leonardo da Vinci"]


def test_evidence_supports_what_it_states():
    ev = Evidence.of("The Zorblax protocol was invented by Mira Quen in 1987 in Tallinn.", "two")
    supported = {c.text: ev.supports(c) for c in claims("Mira Quen, Tallinn, Turkey, 1987, 2, 3.")}
    assert supported == {
        "Mira Quen": True,
        "Tallinn": True,
        "Turkey": False,
        "1987": True,
        "2": True,
        "3": False,
    }


def test_possessives_and_case_do_not_make_a_name_unsupported():
    ev = Evidence.of("MIRA QUEN's protocol was adopted by the Bank of England.")
    assert all(ev.supports(c) for c in claims("It was Mira Quen's protocol, says the Bank."))
