from hybrid_serve.agents.pii import Redactor, contains_pii


def test_redacts_and_restores_every_kind():
    text = (
        "Mail jane.doe@example.com or call +1 415-555-0132. Card 4111 1111 1111 1111, "
        "IBAN DE89 3704 0044 0532 0130 00, account no. 12345678. Ask Alice Smith."
    )
    r = Redactor(names=["Alice Smith"])
    out = r.redact(text)
    for secret in [
        "jane.doe@example.com",
        "415-555-0132",
        "4111 1111 1111 1111",
        "DE89 3704 0044 0532 0130 00",
        "12345678",
        "Alice Smith",
    ]:
        assert secret not in out
    for ph in ["[EMAIL_1]", "[PHONE_1]", "[CARD_1]", "[ACCOUNT_1]", "[ACCOUNT_2]", "[NAME_1]"]:
        assert ph in out
    assert r.restore(out) == text


def test_same_value_same_placeholder_across_texts():
    r = Redactor()
    a = r.redact("write to bob@x.org")
    b = r.redact("cc bob@x.org and eve@y.org")
    assert a.endswith("[EMAIL_1]") and "[EMAIL_1]" in b and "[EMAIL_2]" in b


def test_non_luhn_digit_runs_and_plain_text_are_kept():
    r = Redactor()
    assert r.redact("The year 1998 and 42 cats.") == "The year 1998 and 42 cats."
    assert "1234 5678 9012 3456" in r.redact("order 1234 5678 9012 3456")  # fails Luhn
    assert not contains_pii(["What is the capital of France?"])
    assert contains_pii(["reach me at a@b.io"])
