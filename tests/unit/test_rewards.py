"""Verifier table: extraction, parsing and comparison per answer type, and robustness."""

import random
import time

import pytest
import torch

from megatron_ease.rl.rewards import (
    RewardSpec,
    compute_reward,
    compute_rewards,
    extract_answer,
    has_answer_format,
    parse_number,
)

COLORS = ["red", "green", "blue", "yellow"]
ANY = object()  # the canonical parsed form is not the point of the row

# (response, reference answer, answer_type, choices, correct, parsed); parsed None = unparseable.
CASES = [
    # choice
    ("B", "B", "choice", COLORS, True, "B"),
    ("(B)", "B", "choice", COLORS, True, "B"),
    ("b.", "B", "choice", COLORS, True, "B"),
    ("The answer is (C).", "C", "choice", COLORS, True, "C"),
    ("Answer: B. green", "B", "choice", COLORS, True, "B"),
    ("So we get \\boxed{D}", "D", "choice", COLORS, True, "D"),
    ("\\boxed{\\text{(A)}}", "A", "choice", COLORS, True, "A"),
    ("I would pick option c", "C", "choice", COLORS, True, "C"),
    ("Final choice: (B)", "B", "choice", COLORS, True, "B"),
    ("The correct option is B", "B", "choice", COLORS, True, "B"),
    ("A cat is in the picture, so the answer is blue", "C", "choice", COLORS, True, "C"),
    ("green", "B", "choice", COLORS, True, "B"),
    ("I think it's A", "A", "choice", COLORS, True, "A"),
    ("**Answer: D**", "D", "choice", COLORS, True, "D"),
    ("<answer>C</answer>", "C", "choice", COLORS, True, "C"),
    ("(A) red\n(B) green\nAnswer: (B)", "B", "choice", COLORS, True, "B"),
    ("Answer: A", "B", "choice", COLORS, False, "A"),
    ("Answer: E", "B", "choice", COLORS, False, "E"),
    ("A or B", "A", "choice", COLORS, False, None),
    ("The image shows a red car.", "A", "choice", COLORS, False, None),
    ("A dog", "A", "choice", None, False, None),
    ("A is correct", "A", "choice", COLORS, True, "A"),
    ("\\boxed{B: green}", "B", "choice", COLORS, True, "B"),
    ("", "A", "choice", COLORS, False, None),
    ("The answer is (B) since it is green", "green", "choice", COLORS, True, "B"),
    # after an answer cue the first option letter wins over letters in the prose that follows
    ("The answer is B because A is too small.", "B", "choice", COLORS, True, "B"),
    ("The answer is A because B is too small", "A", "choice", None, True, "A"),
    ("Answer: C, since A and B are too small", "C", "choice", COLORS, True, "C"),
    ("<answer>The answer is B because A is too small</answer>", "B", "choice", COLORS, True, "B"),
    ("The answer is A or B because both fit", "A", "choice", COLORS, False, None),
    ("The answer is A dog", "A", "choice", None, False, None),
    ("B because A is too small.", "B", "choice", COLORS, False, None),
    # yes / no
    ("Yes.", "yes", "yesno", None, True, "yes"),
    ("no", "yes", "yesno", None, False, "no"),
    ("It is not.", "no", "yesno", None, True, "no"),
    ("Yes, there is.", "Yes", "yesno", None, True, "yes"),
    ("No, there isn't any.", "no", "yesno", None, True, "no"),
    ("There are two dogs.", "yes", "yesno", None, True, "yes"),
    ("There aren't any dogs.", "no", "yesno", None, True, "no"),
    ("The shirt is not red.", "no", "yesno", None, True, "no"),
    ("It's blue.", "yes", "yesno", None, True, "yes"),
    ("\\boxed{No}", "no", "yesno", None, True, "no"),
    ("The answer is yes.", "yes", "yesno", None, True, "yes"),
    ("Certainly not.", "no", "yesno", None, True, "no"),
    ("True", "yes", "yesno", None, True, "yes"),
    ("Not at all.", "no", "yesno", None, True, "no"),
    ("I'd say yes, definitely.", "yes", "yesno", None, True, "yes"),
    ("Nope", "no", "yesno", None, True, "no"),
    ("Yes or no? Hard to say.", "yes", "yesno", None, False, None),
    ("Yes and no.", "no", "yesno", None, False, None),
    ("I don't know.", "no", "yesno", None, False, None),
    ("maybe", "yes", "yesno", None, False, None),
    ("There is no dog in the image.", "no", "yesno", None, True, "no"),
    ("It does not appear so.", "no", "yesno", None, True, "no"),
    ("Is there a dog? Yes", "yes", "yesno", None, True, "yes"),
    ("Answer: NO", "No.", "yesno", None, True, "no"),
    # hedges commit to nothing, whatever else they say
    ("Not sure.", "no", "yesno", None, False, None),
    ("Unsure.", "yes", "yesno", None, False, None),
    ("No idea.", "no", "yesno", None, False, None),
    ("I can't tell.", "no", "yesno", None, False, None),
    ("It cannot be determined from the image.", "no", "yesno", None, False, None),
    ("I'm not sure, but I think yes.", "yes", "yesno", None, False, None),
    # affirming adverbs yield to the answer that follows them; a leading "Yes" does not
    ("Sure, there is no cat.", "no", "yesno", None, True, "no"),
    ("Absolutely no.", "no", "yesno", None, True, "no"),
    ("Of course not.", "no", "yesno", None, True, "no"),
    ("Sure, there is a cat.", "yes", "yesno", None, True, "yes"),
    ("Absolutely!", "yes", "yesno", None, True, "yes"),
    ("No doubt about it.", "yes", "yesno", None, True, "yes"),
    ("Yes, there is no cat.", "yes", "yesno", None, True, "yes"),
    # number
    ("\\boxed{1,234}", "1234", "number", None, True, "1234"),
    ("The answer is 3/4.", "0.75", "number", None, True, "0.75"),
    ("Answer: 50%", "50", "number", None, True, "50%"),
    ("Answer: 50%", "0.5", "number", None, True, "50%"),
    ("Answer: 0.5%", "50%", "number", None, False, "0.5%"),
    ("It is 12 cm long.", "12", "number", None, True, "12"),
    ("Answer: -0.5", "-1/2", "number", None, True, "-0.5"),
    ("$\\frac{3}{4}$", "0.75", "number", None, True, "0.75"),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", "number", None, True, "0.5"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", "number", None, True, "-0.5"),
    ("\\boxed{\\frac12}", "0.5", "number", None, True, "0.5"),
    ("x = 5", "5", "number", None, True, "5"),
    ("2 + 3 = 5", "5", "number", None, True, "5"),
    ("Answer: 1,000,000", "1e6", "number", None, True, "1000000"),
    ("\\boxed{3 \\times 10^{4}}", "30000", "number", None, True, "30000"),
    ("\\boxed{2\\frac{1}{2}}", "2.5", "number", None, True, "2.5"),
    ("Answer: 0.3333333", "1/3", "number", None, True, ANY),
    ("Answer: 0.33", "1/3", "number", None, False, "0.33"),
    ("Answer: 12", "13", "number", None, False, "12"),
    ("There are two dogs.", "2", "number", None, True, "2"),
    ("There are 2 dogs and 3 cats.", "2", "number", None, True, "2"),
    ("Answer: 1/0", "1", "number", None, False, None),
    ("\\boxed{}", "1", "number", None, False, None),
    ("½", "0.5", "number", None, True, "0.5"),
    ("\u22123", "-3", "number", None, True, "-3"),
    ("Answer: 1e999", "1", "number", None, False, None),
    ("Approximately 7.5 m/s", "7.5", "number", None, True, "7.5"),
    ("$12.50", "12.5", "number", None, True, "12.5"),
    ("The angle is 30°.", "30", "number", None, True, "30"),
    ("The angle is $30^\\circ$.", "30", "number", None, True, "30"),
    ("first \\boxed{2} then \\boxed{3", "2", "number", None, True, "2"),
    ("no idea", "4", "number", None, False, None),
    ("It costs \\$18.90.", "18.9", "number", None, True, "18.9"),
    # "one" as a pronoun is no count; "no one" / "nobody" / "none" count zero
    ("There is no one in the picture.", "0", "number", None, True, "0"),
    ("There is no one in the picture.", "1", "number", None, False, "0"),
    ("Nobody is there.", "0", "number", None, True, "0"),
    ("None.", "0", "number", None, True, "0"),
    ("Someone is standing there.", "1", "number", None, False, None),
    ("Everyone is smiling.", "1", "number", None, False, None),
    ("One of them is red.", "1", "number", None, True, "1"),
    ("The one on the left.", "1", "number", None, False, None),
    ("Only one dog.", "1", "number", None, True, "1"),
    ("Only one of them is red.", "1", "number", None, True, "1"),
    # math
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", "math", None, True, ANY),
    ("\\boxed{0.75}", "\\frac{3}{4}", "math", None, True, ANY),
    ("\\boxed{x = 2}", "2", "math", None, True, ANY),
    ("\\boxed{2x+1}", "2x + 1", "math", None, True, "2x+1"),
    ("\\boxed{2x+1}", "2x+2", "math", None, False, "2x+1"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", "math", None, True, "\\frac{1}{2}"),
    ("\\boxed{(1, 2)}", "(1,2)", "math", None, True, "(1,2)"),
    ("\\boxed{\\sqrt{2}}", "2", "math", None, False, ANY),
    ("\\boxed{50\\%}", "0.5", "math", None, True, ANY),
    ("\\boxed{10\\text{ cm}}", "10", "math", None, True, "10"),
    ("\\boxed{\\pi}", "\\pi", "math", None, True, "\\pi"),
    ("\\boxed{3.0}", "3", "math", None, True, "3.0"),
    ("\\boxed{2\\sqrt2}", "2\\sqrt{2}", "math", None, True, "2\\sqrt{2}"),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", "math", None, True, "(1,2)"),
    ("\\boxed{\\text{east}}", "east", "math", None, True, "east"),
    ("", "1", "math", None, False, None),
    ("\\boxed{\\$18.90}", "18.90", "math", None, True, "18.90"),
    ("\\boxed{18.90}", "\\$18.90", "math", None, True, "18.90"),
    ("\\boxed{\\$18.90}", "18.91", "math", None, False, "18.90"),
    ("<answer>The answer is 42</answer>", "42", "math", None, True, "42"),
    # text
    ("\\boxed{The Eiffel Tower}", "eiffel tower", "text", None, True, "eiffel tower"),
    ("Answer: red.", "Red", "text", None, True, "red"),
    ("Answer: dark red", "red", "text", None, False, "dark red"),
    ("<answer>New York City</answer>", "new york city", "text", None, True, "new york city"),
    ("\\boxed{\\text{blue}}", "blue", "text", None, True, "blue"),
    ("Answer: A dog", "dog", "text", None, True, "dog"),
    ("...", "x", "text", None, False, None),
    ("Café", "café", "text", None, True, "café"),
    ("<answer>Answer: red</answer>", "red", "text", None, True, "red"),
    ("<answer>The answer is dark blue.</answer>", "dark blue", "text", None, True, "dark blue"),
    # where the answer is taken from
    ("<think>maybe \\boxed{3}</think>The answer is \\boxed{4}", "4", "number", None, True, "4"),
    ("<think>it is \\boxed{3}</think>\n4", "4", "number", None, True, "4"),
    ("Answer:\n12", "12", "number", None, True, "12"),
    ("The answer is 7. Because 3 + 4 = 7 and not 8", "7", "number", None, True, "7"),
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5", "number", None,
     True, "5"),
    ("<answer>x is \\boxed{9}</answer> \\boxed{8}", "9", "number", None, True, "9"),
    ("<answer>about 7</answer>\nAnswer: 8", "7", "number", None, True, "7"),
    # Unicode numerals: NFKC alone glues them to the digits before ("1½" -> "11/2", "3²" -> "32").
    ("1\u00bd", "1.5", "number", None, True, "1.5"),
    ("It's 3\u00be inches", "3.75", "number", None, True, "3.75"),
    ("\u00bd", "0.5", "number", None, True, "0.5"),
    ("3\u00b2", "9", "number", None, True, "9"),
    ("3\u00b2", "32", "number", None, False, "9"),
    ("5 m\u00b2", "5", "number", None, True, "5"),
    ("m2", "m\u00b2", "text", None, True, "m2"),
    ("\\boxed{\\frac{3}{2}}", "1\u00bd", "math", None, True, ANY),
    ("\\boxed{x\u00b2}", "x^2", "math", None, True, "x^2"),
    # Integer powers of numerals; single-character exponent braces are optional in math.
    ("Answer: 2^{10}", "1024", "number", None, True, "1024"),
    ("Answer: 2^10", "1024", "number", None, True, "1024"),
    ("Answer: 10^{-3}", "0.001", "number", None, True, "0.001"),
    ("\\boxed{2^{10}}", "1024", "math", None, True, ANY),
    ("\\boxed{1024}", "2^{10}", "math", None, True, ANY),
    ("\\boxed{x^2}", "x^{2}", "math", None, True, "x^2"),
    ("Answer: 0^{-1}", "0", "number", None, False, None),
    ("3.0 x 10^8 m/s", "3e8", "number", None, True, "300000000"),
    ("5\u00b710\u207b\u00b3", "0.005", "number", None, True, "0.005"),
    # A one-letter text answer is not an article to drop.
    ("A", "A", "text", None, True, "a"),
    ("The", "A", "text", None, False, "the"),
]


# From a review of rollouts a policy could exploit (2026-12-03): answers that hedge between
# options, reject the option they name, or never finish, scored correct before; and correct
# answers in common formats scored wrong. (response, answer, type, choices, correct, parsed).
HEDGES_AND_FORMATS = [
    ("The answer is not B.", "B", "choice", COLORS, False, None),
    ("Answer: B is incorrect", "B", "choice", COLORS, False, None),
    ("(D) can be ruled out.", "D", "choice", COLORS, False, None),
    ("(A) red - no\n(B) green - no\n(C) blue - no\n(D) yellow - no", "D", "choice", COLORS, False,
     None),
    ("Answer: (A) or (B)", "A", "choice", COLORS, False, None),
    ("A (or B)", "A", "choice", COLORS, False, None),
    ("A; B", "A", "choice", COLORS, False, None),
    ("A|B", "A", "choice", COLORS, False, None),
    ("(A) (B) (C) (D)", "A", "choice", COLORS, False, None),
    ("(B) green", "B", "choice", COLORS, True, "B"),
    ("(B) Not visible", "B", "choice", ["red", "Not visible"], True, "B"),
    ("Answer: B. A is too small.", "B", "choice", COLORS, True, "B"),
    ("Answer: B, not A", "B", "choice", COLORS, True, "B"),
    ("(C) blue, not (A) red", "C", "choice", COLORS, True, "C"),
    ("The answer is (B) green, not red.", "B", "choice", COLORS, True, "B"),
    ("(A) there is no dog in the image", "A", "choice", ["There is no dog", "A dog"], True, "A"),
    ("Yes/No", "yes", "yesno", None, False, None),
    ("Yes. No.", "yes", "yesno", None, False, None),
    ("Yes, but actually no.", "yes", "yesno", None, False, None),
    ("No, wait, yes.", "no", "yesno", None, False, None),
    ("It could be.", "yes", "yesno", None, False, None),
    ("It might be.", "yes", "yesno", None, False, None),
    ("Not enough information", "no", "yesno", None, False, None),
    ("It is neither.", "no", "yesno", None, False, None),
    ("Yes, there is no cat.", "yes", "yesno", None, True, "yes"),
    ("No, there is no cat.", "no", "yesno", None, True, "no"),
    ("5 or 6", "5", "number", None, False, None),
    ("5-6", "5", "number", None, False, None),
    ("between 5 and 6", "5", "number", None, False, None),
    ("5 to 6 apples", "5", "number", None, False, None),
    ("not 5", "5", "number", None, False, None),
    ("\u20133", "3", "number", None, False, "-3"),
    ("\\boxed{1\\,000}", "1000", "number", None, True, "1000"),
    ("1{,}000", "1000", "number", None, True, "1000"),
    ("There are 5 dogs and 3 cats, so the answer is 5.", "5", "number", None, True, "5"),
    ("\\boxed{x = 2 \\text{ or } x = 3}", "3", "math", None, False, ANY),
    ("\\boxed{2 = 3}", "3", "math", None, False, ANY),
    ("\\boxed{x = 3}", "3", "math", None, True, ANY),
    ("Answer: B, no wait, C", "B", "choice", COLORS, False, None),
    ("Answer: (B) no", "B", "choice", COLORS, False, None),
    ("Answer: B \u2014 no", "B", "choice", COLORS, False, None),
    ("Answer: B isn't right", "B", "choice", COLORS, False, None),
    ("(B) No", "B", "choice", ["Yes", "No"], True, "B"),
    ("Answer: 5 or maybe 6", "5", "number", None, False, None),
    ("Answer: 5, or 6", "5", "number", None, False, None),
    ("Answer: 1, 2", "1", "number", None, False, None),
    ("Answer: 5 \u2014 6", "5", "number", None, False, None),
    ("Answer: 5 and/or 6", "5", "number", None, False, None),
    ("B is incorrect.", "B", "choice", COLORS, False, None),
    ("Option B is incorrect.", "B", "choice", COLORS, False, None),
    ("Answer: Not B", "B", "choice", COLORS, False, None),
    ("5 ~ 6 people", "5", "number", None, False, None),
    ("Answer: 5, or possibly 6", "5", "number", None, False, None),
    ("5 (or 6)", "5", "number", None, False, None),
    ("Not clear.", "no", "yesno", None, False, None),
    ("No way to tell.", "no", "yesno", None, False, None),
    ("Thus, $x = 4$.", "4", "math", None, True, ANY),
    ("Therefore, $\\angle ABC = 40^\\circ$.", "40", "math", None, True, ANY),
    ("\\boxed{x = 3, y = 4}", "4", "math", None, False, ANY),
    ("Answer: B or possibly C", "B", "choice", COLORS, False, None),
    ("at least 5", "5", "number", None, False, None),
    ("There are more than 5 birds.", "5", "number", None, False, None),
    ("5 or more", "5", "number", None, False, None),
    ("Answer: 5+", "5", "number", None, False, None),
    ("2 + 3 = 5", "5", "number", None, True, "5"),
    ("The answer is 5, at least from this angle.", "5", "number", None, True, "5"),
    ("Answer: B\n\nThe answer is supported by the red car on the left.", "B", "choice", COLORS,
     True, "B"),
    ("Answer: 3\n\nThe answer is clear from the three dogs in the picture.", "3", "number", None,
     True, "3"),
    ("I think the answer is that it is red. The answer is A.", "A", "choice", COLORS, True, "A"),
    # Committed answers the rules above must not touch (a second review's regression set).
    ("Answer: (D) O", "D", "choice", ["A", "B", "AB", "O"], True, "D"),
    ("(B) T-shirt", "B", "choice", ["Dress", "T-shirt", "Jacket"], True, "B"),
    ("(B) A Cat", "B", "choice", ["A Dog", "A Cat", "A Bird"], True, "B"),
    ("(D) B and C", "D", "choice", ["A", "B", "C", "B and C"], True, "D"),
    ("Answer: (B) The man is not wearing a hat, as his head is bare.", "B", "choice",
     ["The man is wearing a hat", "The man is not wearing a hat"], True, "B"),
    ("So the correct option is (B), since the man is not wearing a hat.", "B", "choice",
     ["The man is wearing a hat", "The man is not wearing a hat"], True, "B"),
    ("Therefore, the correct option is B, as the car is not red.", "B", "choice", COLORS, True,
     "B"),
    ("The answer is B, because A and C are incorrect.", "B", "choice", COLORS, True, "B"),
    ("Answer: (B) green, the others are wrong.", "B", "choice", COLORS, True, "B"),
    ("Yes, no one is in the room.", "yes", "yesno", None, True, "yes"),
    ("Yes, no doubt.", "yes", "yesno", None, True, "yes"),
    ("Yes, the man is wearing glasses but no hat.", "yes", "yesno", None, True, "yes"),
    ("No, neither of them is wearing a hat.", "no", "yesno", None, True, "no"),
    ("Yes, it may be partially hidden but it is there", "yes", "yesno", None, True, "yes"),
    ("No, it is not.", "no", "yesno", None, True, "no"),
    ("Answer: No one", "0", "number", None, True, "0"),
    ("Answer: 4, 2 on each side.", "4", "number", None, True, "4"),
    ("Answer: 2 - 1 red and 1 blue", "2", "number", None, True, "2"),
    ("Answer: 10 \u2013 3 on the left and 7 on the right", "10", "number", None, True, "10"),
    ("\\boxed{\\theta = 30^\\circ}", "30", "math", None, True, ANY),
    ("\\boxed{f(3) = 7}", "7", "math", None, True, ANY),
    ("\\boxed{x = \\frac{12}{2} = 6}", "6", "math", None, True, ANY),
    ("\\boxed{3 \\times 4 = 12}", "12", "math", None, True, ANY),
    ("Note: I do not output <think> here. \\boxed{3}", "3", "math", None, True, ANY),
    ("<think>Counting the shapes: maybe the answer is B. Hmm, wait, let me recount the", "B",
     "choice", COLORS, False, None),
    ("<think>It is B.</think> The answer is B.", "B", "choice", COLORS, True, "B"),
    # A hedged option (hedges inside the options' own texts do not count).
    ("B (not sure)", "B", "choice", COLORS, False, None),
    ("Answer: B (I'm not certain)", "B", "choice", COLORS, False, None),
    ("Probably B", "B", "choice", COLORS, False, None),
    ("B, probably.", "B", "choice", COLORS, False, None),
    ("Answer: maybe option C", "C", "choice", COLORS, False, None),
    ("(C) Not sure", "C", "choice", ["Yes", "No", "Not sure"], True, "C"),
    ("(B) Possibly red", "B", "choice", ["Certainly red", "Possibly red"], True, "B"),
    ("The object is probably a cup, so the answer is B.", "B", "choice", COLORS, True, "B"),
    ("The most likely answer is B.", "B", "choice", COLORS, True, "B"),
    ("The answer is likely A.", "A", "choice", COLORS, False, None),
    ("Answer: B (most likely)", "B", "choice", COLORS, False, None),
    ("B, I guess.", "B", "choice", COLORS, False, None),
    ("A, though I'm not entirely sure.", "A", "choice", COLORS, False, None),
    ("B (uncertain)", "B", "choice", COLORS, False, None),
    ("I cannot tell for sure, but B.", "B", "choice", COLORS, False, None),
    ("B, but it is hard to say.", "B", "choice", COLORS, False, None),
    # Hedge words about the image, or an option's own words, leave the option named.
    ("A, since the object is probably a cup", "A", "choice", COLORS, True, "A"),
    ("A. It looks like a cup, maybe a mug.", "A", "choice", COLORS, True, "A"),
    ("(B) bowl - the rim is not clear but the shape fits", "B", "choice", COLORS, True, "B"),
    ("B. The pattern on the rim is unclear, but the depth shows it is a bowl.", "B", "choice",
     COLORS, True, "B"),
    ("D. It's impossible to determine.", "D", "choice",
     ["red", "blue", "green", "Cannot be determined"], True, "D"),
    ("The answer is D, as there is insufficient information in the image.", "D", "choice",
     ["red", "blue", "green", "Not enough information"], True, "D"),
    ("B, because size does not necessarily determine weight.", "B", "choice",
     ["Yes", "A larger object is not necessarily heavier"], True, "B"),
    # Hedged yes/no: a hedge word next to the answer, or anywhere in a span without one.
    ("Probably yes.", "yes", "yesno", None, False, None),
    ("Likely yes.", "yes", "yesno", None, False, None),
    ("Yes, probably.", "yes", "yesno", None, False, None),
    ("Yes, most likely.", "yes", "yesno", None, False, None),
    ("It is unlikely.", "no", "yesno", None, False, None),
    ("Not necessarily.", "no", "yesno", None, False, None),
    ("It's probably a wolf, not a dog.", "no", "yesno", None, False, None),
    ("Based on the image, yes, the dog is likely a puppy.", "yes", "yesno", None, True, "yes"),
    ("The man is holding a leash. He is probably the owner, so yes.", "yes", "yesno", None, True,
     "yes"),
    ("Yes, it may be partially hidden, but it is there.", "yes", "yesno", None, True, "yes"),
    # A negated statement answers no, whichever clause holds the negation.
    ("There is no cat, only a dog.", "no", "yesno", None, True, "no"),
    ("The man, however, is not wearing a hat.", "no", "yesno", None, True, "no"),
    ("While there is a table, there are no chairs.", "no", "yesno", None, True, "no"),
    ("There is a cat? No.", "no", "yesno", None, True, "no"),
    ("None of the people are wearing hats.", "no", "yesno", None, True, "no"),
    ("Neither of them is wearing a hat.", "no", "yesno", None, True, "no"),
    ("Nobody is in the room.", "no", "yesno", None, True, "no"),
    ("Neither.", "no", "yesno", None, False, None),
    ("It is neither red nor blue.", "no", "yesno", None, False, None),
    # A third review: the first numeral of an expression read as the answer ...
    ("\\boxed{2\\sqrt{3}}", "2", "number", None, False, None),
    ("\\boxed{x^2}", "2", "number", None, False, None),
    ("\\boxed{\\sqrt{9}}", "9", "number", None, False, None),
    ("\\boxed{3\\pi}", "3", "number", None, False, None),
    ("\\boxed{e^{2}}", "2", "number", None, False, None),
    ("\\boxed{\\log_2 8}", "2", "number", None, False, None),
    ("\\boxed{5!}", "5", "number", None, False, None),
    ("\\boxed{x + 5}", "5", "number", None, False, None),
    # ... and so in a reference, which is then compared as text.
    ("\\boxed{4\\sqrt{3}}", "4\\sqrt{2}", "number", None, False, "4 sqrt 3"),
    ("\\boxed{4\\sqrt{3}}", "4\\sqrt{3}", "number", None, True, "4 sqrt 3"),
    # Times and ratios are no single number.
    ("Answer: 10:45", "10:30", "number", None, False, "10 45"),
    ("Answer: 10:45", "10:45", "number", None, True, "10 45"),
    ("Answer: 3:2", "3:4", "number", None, False, "3 2"),
    ("Answer: 10:45", "10", "number", None, False, None),
    # Plain-text mixed numbers and space-separated thousands.
    ("Answer: 2 1/2", "2.5", "number", None, True, "2.5"),
    ("Answer: 2 1/2", "2", "number", None, False, "2.5"),
    ("Answer: 1 000 000", "1e6", "number", None, True, "1000000"),
    # An adverb after the cue does not hide the answer; an empty last cue does not replace one.
    ("The answer is clearly 12.\nEach row has 4 apples.", "12", "number", None, True, "12"),
    ("The answer is obviously no.\nThe dog is visible.", "no", "yesno", None, True, "no"),
    ("The answer is clearly red.", "red", "text", None, True, "red"),
    ("Answer: 5\nAnswer:", "5", "number", None, True, "5"),
    # Three or more alternatives, and options or answers side by side.
    ("Answer: 5, 6, 7", "5", "number", None, False, None),
    ("Answer: 5 or 6 or 7", "5", "number", None, False, None),
    ("Answer: 5; 6; 7", "5", "number", None, False, None),
    ("Answer: 5 6 7", "5", "number", None, False, None),
    ("Answer: 5 or 6 red apples", "5", "number", None, False, None),
    ("Answer: A C", "A", "choice", COLORS, False, None),
    ("Answer: A+B", "A", "choice", COLORS, False, None),
    ("Answer: A. B. C.", "A", "choice", COLORS, False, None),
    ("The answer is A, also B", "A", "choice", COLORS, False, None),
    ("Answer: yes no", "yes", "yesno", None, False, None),
    ("Answer: True False", "yes", "yesno", None, False, None),
    # Guards for the rules above: units, bounds words and sentences after an option still read.
    ("Answer: 5\\,\\mu\\text{m}", "5", "number", None, True, "5"),
    ("Answer: 10 \\Omega", "10", "number", None, True, "10"),
    ("Answer: \\approx 5", "5", "number", None, True, "5"),
    ("Answer: $5", "5", "number", None, True, "5"),
    ("Answer: 45°", "45", "number", None, True, "45"),
    ("\\boxed{x = 5}", "5", "number", None, True, "5"),
    ("Answer: 4, 2 on each side", "4", "number", None, True, "4"),
    ("Answer: A. B is too small.", "A", "choice", COLORS, True, "A"),
    ("Answer: Yes, no doubt.", "yes", "yesno", None, True, "yes"),
    # A fourth review (tolerance edges, hedges outside the span). Numeric tolerance: no absolute
    # slack ("0" matched any reference below 1e-9, e.g. G = 6.67e-11), integers exactly (a
    # relative 1e-6 let 1000001 pass for 1000000); floats keep the relative tolerance.
    ("\\boxed{0}", "6.67 \\times 10^{-11}", "number", None, False, "0"),
    ("Answer: 0", "1.6e-19", "number", None, False, "0"),
    ("\\boxed{0}", "6.67e-11", "math", None, False, ANY),
    ("Answer: 1e-10", "0", "number", None, False, "1e-10"),
    ("Answer: 1000001", "1000000", "number", None, False, "1000001"),
    ("Answer: 123456789", "123456790", "number", None, False, "123456789"),
    ("\\boxed{1000001}", "1000000", "math", None, False, ANY),
    ("\\boxed{6.674 \\times 10^{-11}}", "6.674e-11", "number", None, True, "6.674e-11"),
    ("Answer: 6.0200001e23", "6.02e23", "number", None, True, ANY),
    ("Answer: -0", "0", "number", None, True, ANY),
    # A sign in words is a sign, not dropped.
    ("Answer: negative 5", "5", "number", None, False, "-5"),
    ("Answer: minus 3 degrees", "-3", "number", None, True, "-3"),
    ("Answer: negative five", "5", "number", None, False, "-5"),
    ("\\boxed{\\text{minus }5}", "5", "number", None, False, "-5"),  # inside LaTeX too
    # A near miss of a whole number is no match; float noise is.
    ("Answer: 1000000.5", "1000000", "number", None, False, "1000000.5"),
    ("Answer: 3.0000000001", "3", "number", None, True, ANY),
    # Bounds and comparisons state no value; "±" and a parenthesised base are expressions.
    ("Answer: under 5", "5", "number", None, False, None),
    ("There are over 20 people.", "20", "number", None, False, None),
    ("Answer: <5", "5", "number", None, False, None),
    ("Answer: x > 5", "5", "number", None, False, None),
    ("Answer: x >= 5", "5", "number", None, False, None),
    ("\\boxed{x >= 5}", "5", "math", None, False, ANY),
    ("Answer: 3 < x < 5", "3", "number", None, False, None),
    ("Answer: 5 \u00b1 1", "5", "number", None, False, None),
    ("Answer: (-2)^2", "-2", "number", None, False, None),
    ("Answer: 5 <br>", "5", "number", None, True, "5"),
    ("Answer: 5 under the table", "5", "number", None, True, "5"),
    # Boxes side by side are one answer: alternatives earn nothing, the same box twice stands,
    # and a multi-part answer in separate boxes compares as a list.
    ("\\boxed{5} or \\boxed{6}", "6", "number", None, False, None),
    ("$\\boxed{A}$ or $\\boxed{B}$", "B", "choice", COLORS, False, None),
    ("\\boxed{A} \\boxed{B}", "B", "choice", COLORS, False, None),
    ("\\boxed{yes} \\text{ or } \\boxed{no}", "no", "yesno", None, False, None),
    ("\\boxed{red} or \\boxed{blue}", "blue", "text", None, False, "red or blue"),
    ("\\boxed{5}, \\boxed{6}", "6", "math", None, False, ANY),
    ("\\boxed{2} and \\boxed{3}", "2, 3", "math", None, True, ANY),
    ("\\boxed{B} \\boxed{B}", "B", "choice", COLORS, True, "B"),
    ("Step 1 gives \\boxed{3}. Final: \\boxed{5}", "5", "number", None, True, "5"),
    # A negation right before the option rejects it.
    ("Answer: It is not A", "A", "choice", COLORS, False, None),
    ("Answer: Neither A nor B", "B", "choice", COLORS, False, None),
    ("Answer: B, not A", "B", "choice", COLORS, True, "B"),
    # A negated "no" commits to nothing; a statement's truth value answers.
    ("The answer is not no.", "no", "yesno", None, False, None),
    ("Answer: not no", "no", "yesno", None, False, None),
    ("The answer is not yes.", "no", "yesno", None, True, "no"),
    ("Answer: It's false.", "yes", "yesno", None, False, "no"),
    ("Answer: The statement is incorrect.", "no", "yesno", None, True, "no"),
    ("Answer: It is not false.", "yes", "yesno", None, True, "yes"),
    ("It is true that there is no dog.", "no", "yesno", None, True, "no"),
]


@pytest.mark.parametrize(
    "response, answer, answer_type, choices, correct, parsed",
    HEDGES_AND_FORMATS,
    ids=[f"{c[2]}-{i}" for i, c in enumerate(HEDGES_AND_FORMATS)],
)
def test_hedges_rejections_and_unfinished_answers_are_not_credited(response, answer, answer_type,
                                                                   choices, correct, parsed):
    test_verifier_table(response, answer, answer_type, choices, correct, parsed)


@pytest.mark.parametrize("filler", [" " * 16000, "\u3000" * 16000, " \n" * 8000, "3" * 16000,
                                    "\u00b2" * 16000, "2\u00bd" * 8000])
@pytest.mark.parametrize("answer_type", ["choice", "number", "math", "yesno"])
def test_long_runs_of_whitespace_or_digits_are_verified_quickly(filler, answer_type):
    """Some patterns restarted at every character of a long whitespace or digit run: seconds
    per rollout (quadratic within the scanned tail); a degenerate 0.3333... rollout costs that."""
    # This process's CPU time, not wall time: ~60 ms here, and a shared machine's load must not
    # push it past the limit (a quadratic pattern takes seconds).
    start = time.process_time()
    for response in (f"Answer: x{filler}x", f"Answer: 1{filler}\\frac{{1}}{{2}}", filler + "B"):
        compute_reward(response, "1", answer_type, COLORS if answer_type == "choice" else None)
    assert time.process_time() - start < 0.5


@pytest.mark.parametrize(
    "response, answer, answer_type, choices, correct, parsed",
    CASES,
    ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)],
)
def test_verifier_table(response, answer, answer_type, choices, correct, parsed):
    result = compute_reward(response, answer, answer_type, choices)
    assert result.correct is correct
    assert result.parse_ok is (parsed is not None)
    if parsed is not ANY:
        assert result.parsed == parsed
    assert result.reward == (1.0 if correct else -1.0)


def test_table_is_large_and_covers_every_answer_type():
    assert len(CASES) >= 60
    assert {c[2] for c in CASES} == {"choice", "number", "yesno", "text", "math"}


@pytest.mark.parametrize(
    "text, span",
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("a \\boxed{1} b \\boxed{{2}+{3}}", "{2}+{3}"),
        ("\\fbox{7}", "7"),
        ("The answer is: 42", "42"),
        ("**Answer**: 42", "42"),
        ("<answer>Answer: red</answer>", "red"),
        ("<answer>The answer is 42</answer>", "42"),
        ("<answer>\n  red car \n</answer>", "red car"),
        ("line one\n\nlast line  \n\n", "last line"),
        ("The answer is clearly 12.\nEach row has 4 apples.", "12."),
        ("Answer: 5\nAnswer:", "5"),
        ("Answer: A. B. C.", "A. B. C."),
        ("   ", None),
        (None, None),
    ],
)
def test_extract_answer_spans(text, span):
    assert extract_answer(text) == span


def test_parse_number_strict_rejects_expressions():
    assert parse_number("2x", strict=True) is None
    assert parse_number("\\sqrt{2}", strict=True) is None
    assert parse_number("\\frac{3}{4}", strict=True).value == 0.75
    assert parse_number("2x").value == 2.0  # lenient mode reads the leading numeral


# --- format reward and configuration ----------------------------------------------------------


@pytest.mark.parametrize(
    "response, answer_format, expected",
    [
        ("so \\boxed{3}", "boxed", True),
        ("Answer: 3", "boxed", False),
        ("Answer: 3", "answer", True),
        ("<answer>3</answer>", "answer", True),
        ("so \\boxed{3}", "answer", False),
        ("so \\boxed{3}", "boxed_or_answer", True),
        ("3", "boxed_or_answer", False),
        ("so \\boxed{3", "boxed", False),
    ],
)
def test_has_answer_format(response, answer_format, expected):
    assert has_answer_format(response, answer_format) is expected


def test_format_reward_is_added_to_right_and_wrong_verdicts():
    spec = RewardSpec(
        correct_reward=1.0, wrong_reward=0.0, format_reward=0.1, answer_format="boxed"
    )
    assert compute_reward("\\boxed{3}", "3", "number", spec=spec).reward == pytest.approx(1.1)
    assert compute_reward("\\boxed{4}", "3", "number", spec=spec).reward == pytest.approx(0.1)
    unformatted = compute_reward("3", "3", "number", spec=spec)
    assert unformatted.reward == 1.0 and unformatted.correct and not unformatted.format_ok


def test_configuration_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="answer_type must be one of"):
        compute_reward("3", "3", "integer")
    with pytest.raises(ValueError, match="answer_format must be one of"):
        RewardSpec(answer_format="xml")


# --- robustness -------------------------------------------------------------------------------


@pytest.mark.parametrize("answer_type", ["choice", "number", "yesno", "text", "math"])
@pytest.mark.parametrize(
    "response",
    [None, "", " \n\t ", b"\xff\xfe answer", 12345, "\u0000\u200b\ufeff", "🙂" * 100,
     "{" * 5000, "}" * 5000, "\\boxed{" * 3000, "\\frac{" * 3000 + "1" + "}" * 3000,
     "9" * 5000, "1," * 3000, "Answer:" * 2000, "<answer>" * 2000, "$" * 5000],
)
def test_odd_output_never_crashes(response, answer_type):
    result = compute_reward(response, "A", answer_type, COLORS)
    assert isinstance(result.reward, float) and isinstance(result.correct, bool)


def test_random_unicode_never_crashes():
    rng = random.Random(0)
    alphabet = "0123456789abcAB{}()[]\\/$%.,:=-+ \n" + "".join(map(chr, range(0x370, 0x3a0)))
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        for answer_type in ("choice", "number", "yesno", "text", "math"):
            compute_reward(text, "1", answer_type)


def test_huge_response_is_verified_quickly_from_its_tail():
    response = "blah " * 2_000_000 + "\nThe answer is \\boxed{42}."
    start = time.process_time()  # CPU time: load elsewhere does not count
    result = compute_reward(response, "42", "number")
    assert result.correct
    assert time.process_time() - start < 2.0


# --- batched ----------------------------------------------------------------------------------


def test_compute_rewards_batches_results_into_tensors():
    batch = compute_rewards(
        ["\\boxed{3}", "Answer: 4", "gibberish", "(B)"],
        ["3", "3", "3", "B"],
        ["number", "number", "number", "choice"],
        [None, None, None, COLORS],
    )
    assert batch.reward.dtype == torch.float32 and batch.accuracy.dtype == torch.float32
    assert batch.reward.tolist() == [1.0, -1.0, -1.0, 1.0]
    assert batch.accuracy.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert batch.parse_ok.tolist() == [True, True, False, True]
    assert batch.format_ok.tolist() == [True, True, False, False]
    assert batch.num_unparsed == 1
    assert len(batch.results) == 4


def test_compute_rewards_broadcasts_a_single_answer_type_and_checks_lengths():
    batch = compute_rewards(["yes", "no"], ["yes", "yes"], "yesno")
    assert batch.accuracy.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="one entry per rollout"):
        compute_rewards(["yes", "no"], ["yes"], "yesno")
