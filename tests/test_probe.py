from remus.common.probe import read_replies, taken_back


def test_read_replies_skips_errors_and_noise():
    text = '{"t": 1.0, "v": 3}\nTraceback noise\n{"t": 1.5, "err": "URLError"}\n{"t": 2.0, "v": 4}\n'
    assert read_replies(text) == [(1.0, 3), (2.0, 4)]


def test_taken_back_finds_every_reply_not_above_all_earlier_ones():
    assert taken_back([1, 2, 3, 4]) == []
    assert taken_back([1, 2, 5, 3, 4, 6]) == [3, 4]   # a failover rolled 5 back
    assert taken_back([1, 1]) == [1]
    assert taken_back([]) == []
