"""Stop strings are matched on text across token boundaries and never emitted."""

from distributed.text_stream import StopText, TextStream


def feed_all(stop: StopText, pieces: list[str]) -> tuple[str, bool]:
    out = ""
    for piece in pieces:
        text, hit = stop.feed(piece)
        out += text
        if hit:
            return out, True
    return out + stop.flush(), False


def test_stop_string_split_across_pieces_is_cut():
    assert feed_all(StopText(["END"]), ["the qu", "ick E", "N", "D more"]) == ("the quick ", True)


def test_partial_match_that_does_not_complete_is_released():
    assert feed_all(StopText(["END"]), ["an E", "Nd", " here"]) == ("an ENd here", False)


def test_earliest_of_several_stops_wins():
    stop = StopText(["\n\n", "stop", "st"])
    assert feed_all(stop, ["a stop\n\nb"]) == ("a ", True)
    assert stop.reached == "stop"


def test_text_stream_with_real_tokenizer(tiny_models):
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tiny_models["llama"])
    ids = tokenizer.encode("Rain fell on 12 roofs. Then the sun came out.")
    ended_at = []  # the tokens at which the stream finished the sequence
    stream = TextStream(tokenizer, ["sun"], lambda: ended_at.append(token))
    out = ""
    for token in ids:
        text, hit = stream.add(token)
        out += text
        if hit:
            break
    assert out == "Rain fell on 12 roofs. Then the "
    assert hit and ended_at == [token]
