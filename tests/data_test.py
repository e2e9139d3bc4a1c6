"""Data pipeline: sources, templates, masks, shapes, overflow, slices, mixing."""

import json
import os
import tempfile

from absl.testing import absltest
import datasets
import numpy as np

import testutil
from act_jax import data

RECORDS = [{'question': 'What is 2+2?', 'answer': '4', 'text': 'alpha beta'},
           {'question': 'Capital of France?', 'answer': 'Paris',
            'text': 'gamma'},
           {'question': 'Colour of sky?', 'answer': 'blue',
            'text': 'delta epsilon zeta'}]
CHAT_TEMPLATE = testutil.CHAT_TEMPLATE


class DataTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.tok = testutil.make_tokenizer()
    cls.jsonl = os.path.join(cls.tmp, 'r.jsonl')
    with open(cls.jsonl, 'w') as f:
      for r in RECORDS:
        f.write(json.dumps(r) + '\n')

  def test_sources_agree(self):
    ds = datasets.Dataset.from_list(RECORDS)
    ds.to_parquet(os.path.join(self.tmp, 'r.parquet'))
    ds.save_to_disk(os.path.join(self.tmp, 'saved'))
    datasets.DatasetDict({'train': ds}).save_to_disk(
        os.path.join(self.tmp, 'saved_dict'))
    with open(os.path.join(self.tmp, 'r.json'), 'w') as f:
      json.dump(RECORDS, f)
    for name in ('r.jsonl', 'r.parquet', 'saved', 'saved_dict', 'r.json'):
      self.assertEqual(data.load_records(os.path.join(self.tmp, name)),
                       RECORDS, name)
    txt = os.path.join(self.tmp, 'r.txt')
    with open(txt, 'w') as f:
      f.write('line one\nline two\n')
    self.assertEqual([r['text'] for r in data.load_records(txt)],
                     ['line one', 'line two'])
    self.assertLen(data.load_records(self.jsonl, limit=2), 2)

  def test_bad_sources_name_the_file(self):
    empty = os.path.join(self.tmp, 'empty.jsonl')
    open(empty, 'w').close()
    with self.assertRaisesRegex(data.DataError, 'empty.jsonl: .*empty'):
      data.load_records(empty)
    bad = os.path.join(self.tmp, 'bad.jsonl')
    with open(bad, 'w') as f:
      f.write('{"text": "ok"}\n{not json\n')
    with self.assertRaisesRegex(data.DataError, 'bad.jsonl: line 2 is not JSON'):
      data.load_records(bad)
    with self.assertRaisesRegex(data.DataError, 'nope.jsonl: no such file'):
      data.load_records(os.path.join(self.tmp, 'nope.jsonl'))
    saved = os.path.join(self.tmp, 'dict2')
    datasets.DatasetDict({'train': datasets.Dataset.from_list(
        RECORDS)}).save_to_disk(saved)
    with self.assertRaisesRegex(data.DataError, "dict2: no split 'test'"):
      data.load_records(saved, split='test')
    with self.assertRaisesRegex(data.DataError, 'src: the data set is empty'):
      data.check_fields([], data.DataConfig(), 'src')

  def test_missing_field_names_field_source_and_available(self):
    cfg = data.DataConfig(template='qa', prompt_field='prompt')
    with self.assertRaisesRegex(
        data.DataError, r"r.jsonl: record 1 has no field 'prompt'.*"
        r"\['answer', 'question', 'text'\]"):
      data.check_fields(RECORDS, cfg, self.jsonl)

  def test_qa_response_mask_marks_exactly_the_answer(self):
    cfg = data.DataConfig(template='qa', max_seq_len=64, batch_size=2,
                          loss_on='response',
                          qa_format='Q: {prompt}\nA: {response}.')
    tok = data.tokenize_records(RECORDS, self.tok, cfg)
    for rec, ex in zip(RECORDS, tok.examples):
      text = self.tok.decode(ex.ids[ex.response == 1])
      self.assertEqual(text, rec['answer'] + '.')  # the format's tail too
      self.assertEqual(self.tok.decode(ex.ids),
                       f'Q: {rec["question"]}\nA: {rec["answer"]}.')
    batches = data.make_batches(tok.examples, 2, 64, loss_on='response')
    self.assertLen(batches, 2)
    b = batches[0]
    for key in data.BATCH_KEYS:
      self.assertEqual(b[key].shape, (2, 64))
    np.testing.assert_array_equal(
        b['token_mask_bt'].sum(1), [len(r['answer']) + 1 for r in RECORDS[:2]])
    # All-token counting: the mask is the attention mask.
    all_b = data.make_batches(tok.examples, 2, 64)
    np.testing.assert_array_equal(all_b[1]['token_mask_bt'],
                                  all_b[1]['attention_mask_bt'])
    self.assertEqual(all_b[1]['attention_mask_bt'][1].sum(), 0)  # empty row

  def test_chat_template_response(self):
    tok = testutil.make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    cfg = data.DataConfig(template='chat', max_seq_len=80, add_eos=True)
    out = data.tokenize_records(RECORDS[:1], tok, cfg)
    ex = out.examples[0]
    self.assertEqual(tok.decode(ex.ids[ex.response == 1]), '4</s></s>')
    with self.assertRaisesRegex(data.DataError, 'chat template'):
      data.tokenize_records(RECORDS[:1], testutil.make_tokenizer(), cfg)

  def test_overflow_truncate_counts_and_error_names_record(self):
    cfg = data.DataConfig(max_seq_len=6)
    out = data.tokenize_records(RECORDS, self.tok, cfg, 'src')
    self.assertEqual(out.num_truncated, 2)  # 'gamma' (5 chars) fits
    self.assertEqual(out.num_tokens, 6 + 5 + 6)
    with self.assertRaisesRegex(data.DataError, 'src: record 1 has 10 tokens'):
      data.tokenize_records(RECORDS, self.tok,
                            data.DataConfig(max_seq_len=6, overflow='error'),
                            'src')

  def test_packing_positions_and_masks(self):
    tok = data.tokenize_records(RECORDS, self.tok,
                                data.DataConfig(max_seq_len=16))
    b = data.make_batches(tok.examples, 4, 16, pack=True)
    self.assertLen(b, 1)
    lens = [len(e.ids) for e in tok.examples]  # 10, 5, 16
    np.testing.assert_array_equal(b[0]['attention_mask_bt'].sum(1),
                                  [lens[0] + lens[1], lens[2], 0, 0])
    np.testing.assert_array_equal(b[0]['positions_bt'][0, :15],
                                  list(range(10)) + list(range(5)))
    np.testing.assert_array_equal(b[0]['segment_ids_bt'][0, :16],
                                  [1] * 10 + [2] * 5 + [0])
    np.testing.assert_array_equal(b[0]['segment_ids_bt'][1], [1] * 16)

  def test_shuffle_is_seeded(self):
    recs = [{'text': f'text {i}'} for i in range(20)]
    ids = lambda seed: [self.tok.decode(e.ids) for e in data.tokenize_records(
        recs, self.tok, data.DataConfig(shuffle_seed=seed)).examples]
    self.assertEqual(ids(3), ids(3))
    self.assertNotEqual(ids(3), ids(4))
    self.assertEqual(sorted(ids(3)), sorted(r['text'] for r in recs))
    self.assertEqual(ids(None), [r['text'] for r in recs])

  def test_local_batches_partition_totals(self):
    recs = [{'text': 'x' * (i + 1)} for i in range(7)]
    tok = data.tokenize_records(recs, self.tok, data.DataConfig())
    batches = data.make_batches(tok.examples, 2, 8)  # 4 batches
    total = sum(b['token_mask_bt'].sum() for b in batches)
    for n in (1, 2, 3):
      parts = [data.local_batches(batches, i, n) for i in range(n)]
      self.assertEqual({len(p) for p in parts}, {-(-4 // n)})
      self.assertEqual(sum(b['token_mask_bt'].sum() for p in parts
                           for b in p), total)
    # Contiguous: process 0 of 2 holds batches 0 and 1.
    np.testing.assert_array_equal(data.local_batches(batches, 0, 2)[1][
        'tokens_bt'], batches[1]['tokens_bt'])

  def test_mix_sources(self):
    a = [{'src': 'a', 'i': i} for i in range(10)]
    b = [{'src': 'b', 'i': i} for i in range(3)]
    mixed = data.mix_sources([(a, 3.0), (b, 1.0)], seed=0, total=40)
    self.assertLen(mixed, 40)
    self.assertEqual(sum(r['src'] == 'a' for r in mixed), 30)
    self.assertEqual(mixed, data.mix_sources([(a, 3.0), (b, 1.0)], 0, 40))
    self.assertNotEqual(mixed, data.mix_sources([(a, 3.0), (b, 1.0)], 1, 40))
    with self.assertRaisesRegex(data.DataError, 'source 1 has weight'):
      data.mix_sources([(a, 1.0), ([], 1.0)])

  def test_template_errors(self):
    with self.assertRaisesRegex(data.TemplateError, 'unknown template'):
      data.required_fields('nope', 'text', 'q', 'a')
    with self.assertRaisesRegex(data.DataError, 'qa_format'):
      data.check_fields(RECORDS, data.DataConfig(template='qa',
                                                 qa_format='{response}'))


if __name__ == '__main__':
  absltest.main()
