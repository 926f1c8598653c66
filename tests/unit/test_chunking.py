import pytest

from hybrid_serve.retrieval.chunking import chunk_text


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}." for i in range(n))  # every word is its own sentence


def test_short_text_is_one_chunk():
    assert chunk_text("One sentence. Two sentences.", 50, 10) == ["One sentence. Two sentences."]


def test_chunks_respect_size_and_overlap():
    chunks = chunk_text(words(100), chunk_words=30, overlap_words=10)
    sizes = [len(c.split()) for c in chunks]
    assert max(sizes) <= 30
    for a, b in zip(chunks, chunks[1:]):
        shared = set(a.split()) & set(b.split())
        assert len(shared) == 10  # consecutive chunks overlap by the configured amount
    # nothing is lost: every word appears in some chunk
    assert set(words(100).split()) == {w for c in chunks for w in c.split()}


def test_chunks_start_on_sentence_boundaries():
    text = " ".join(f"Sentence number {i} has five words." for i in range(20))
    for chunk in chunk_text(text, chunk_words=24, overlap_words=8):
        assert chunk.startswith("Sentence number")
        assert chunk.endswith("words.")


def test_long_sentence_is_windowed():
    text = " ".join(f"x{i}" for i in range(250))  # no sentence end at all
    chunks = chunk_text(text, chunk_words=100, overlap_words=20)
    assert all(len(c.split()) <= 100 for c in chunks)
    assert chunks[0].split()[0] == "x0" and chunks[-1].split()[-1] == "x249"


def test_paragraph_break_ends_a_sentence():
    chunks = chunk_text("Title line\n\nBody text here. More body.", 3, 0)
    assert chunks[0] == "Title line"


@pytest.mark.parametrize("size,overlap", [(0, 0), (10, 10), (10, -1)])
def test_bad_parameters(size, overlap):
    with pytest.raises(ValueError):
        chunk_text("text", size, overlap)


def test_text_without_spaces_is_cut_to_the_character_bound():
    chunks = chunk_text("x" * 10_000 + " tail. Next sentence here.", chunk_chars=4000)
    assert all(len(c) <= 4000 for c in chunks)
    assert "".join(chunks).replace(" ", "").startswith("x" * 10_000)
    assert chunks[-1].endswith("tail. Next sentence here.")
