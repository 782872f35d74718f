"""VQA accuracy (VQAv2, TextVQA) and GQA exact match.

VQAv2 follows the official VQA API's evaluation script (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/
vqaEval.py at a013f00, "Fixed processing answers bug"): an answer is compared with the 10 human answers; for each of
the 10 leave-one-out subsets of 9 annotators the accuracy is min(1, #matching / 3), and the question's accuracy is the
mean of the 10 (so 1, 2, 3, 4+ matching annotators give 0.3, 0.6, 0.9, 1.0). Answers are normalised by
`process_punctuation` then `process_digit_article`, and — a quirk of that script kept in `vqa_accuracy` — only when
the 10 human answers are not all the same string. The VQAv2 suite first passes the model's answer through the EvalAI
answer processor (`vqav2_accuracy`), as a test-dev submission is prepared (LLaVA's convert_vqav2_for_submission.py).

TextVQA follows the evaluator LLaVA's eval_textvqa.py runs (m4c_evaluator.py: `TextVQAAccuracyEvaluator` with
`EvalAIAnswerProcessor`): the same leave-one-out accuracy and normalisation, applied always, after the processor's
`word_tokenize` (lower case, commas and "?" dropped, "'s" split off).

GQA (testdev-balanced): exact match after lower case, strip and dropping a trailing period — what LLaVA's
convert_gqa_for_eval.py does to an answer (`rstrip('.').lower()`) before the GQA eval script compares it.
"""

from __future__ import annotations

import re
from typing import Sequence

# vqaEval.py's tables, verbatim (including its odd entries such as "somebody'd" -> "somebodyd").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# "(?!<=\d)" is vqaEval.py's mistyped look-behind: it is a look-ahead for the text "<=digit", so in effect every
# period not followed by a digit is removed ("2.5" keeps its point, "dog." loses it). Kept as written.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]


def process_punctuation(text: str) -> str:
    """vqaEval.py's processPunctuation. A mark touching a space, or any mark at all in a text with a comma between
    digits, is deleted; otherwise it becomes a space. So "1,000" -> "1000" (digits kept together) but "red,blue"
    -> "red blue"."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official passes re.UNICODE (= 32) as sub's third positional argument, which is `count`: at most 32 periods
    # are removed. Kept.
    return PERIOD_STRIP.sub("", out, 32)


def process_digit_article(text: str) -> str:
    """vqaEval.py's processDigitArticle: lower case, number words 0-10 to digits, articles dropped, contractions
    restored ("dont" -> "don't")."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """vqaEval.py's full normalisation of one answer (whitespace, punctuation, digits/articles/contractions)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def evalai_normalize(text: str) -> str:
    """EvalAIAnswerProcessor (TextVQA's m4c_evaluator): word_tokenize, then the vqaEval normalisation."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_answer(text)


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-annotator-out subsets of min(1, matches / 3) (answers already normalised)."""
    if not answers:
        return 0.0
    accs = []
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one answer against the (10) human answers, as vqaEval.py's `evaluate`."""
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
    # vqaEval.py normalises only when the humans disagree (len(set(gtAnswers)) > 1); when they all wrote the same
    # string, the raw prediction must equal it.
    if len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    return leave_one_out_accuracy(prediction, answers)


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of a model's raw answer as the benchmark pipeline scores it: the answer goes through
    EvalAIAnswerProcessor first (LLaVA's convert_vqav2_for_submission.py does this before the upload to the EvalAI
    server), then vqaEval.py's rule. Without that step "Yes" scores 0 against ten "yes" (see vqa_accuracy)."""
    return vqa_accuracy(evalai_normalize(prediction), answers)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy of one answer, as TextVQAAccuracyEvaluator (both sides always normalised)."""
    return leave_one_out_accuracy(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


def gqa_normalize(text: str) -> str:
    """Strip, drop trailing periods, lower case (convert_gqa_for_eval.py's rstrip('.').lower(), plus the strip)."""
    return text.strip().rstrip(".").lower()


def gqa_match(prediction: str, answer: str) -> bool:
    return gqa_normalize(prediction) == gqa_normalize(answer)
