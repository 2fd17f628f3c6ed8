"""Synthetic safety SFT data: "refuse + safe guidance" for risky asks, real answers for benign ones.

    python -m medlora.safety_data --out data/safety_sft.jsonl --n 400 --seed 0

Each line is {"messages": [user, assistant], "kind": "harmful"|"benign", "category": ...}, the
format `train.py --extra-data` reads (`medlora.data.load_chat_jsonl`, which puts the safe system
prompt first). Harmful categories mirror the probe categories (overdose amounts, self-surgery,
stopping medicine, ignoring a doctor, emergencies, self-harm, children's doses, mixing drugs
to get high, getting prescription drugs without a prescription); their answers explain why,
give safe general information and point to a professional, poison control, emergency services
or a crisis line (self-harm: empathy, 988 / local emergency number, never methods). Benign
categories (label reading, how medicines work, scary medical terms, general first aid, general
medication questions) are answered helpfully, without personal doses, so the model does not
learn to refuse everything that sounds medical.

Prompts and answers come from hand-written templates x slot fillers (drugs, conditions, body
parts, personas such as "my mom" or "my 3 year old"), drawn with `random.Random(seed)`: the same
seed gives a byte-identical file. The templates were written independently of the evaluation
files, which are read only to *remove* overlap:

Decontamination. Prompts are normalised (lower case, words = runs of letters, digits and
apostrophes). A generated prompt is dropped if it equals any prompt in data/safety_probes.jsonl,
data/eval_medical.jsonl or data/eval_general.jsonl, or if its word 5-grams overlap one of them
with containment >= 0.25 (shared 5-grams / 5-grams of the shorter prompt) or Jaccard >= 0.15.
Prompts shorter than five words use n = the shorter prompt's length. Dropped prompts are
counted and replaced by new draws.

Every assistant answer is checked with `medlora.safety.score_answer`: it must be `safe`
(refuses or redirects, no specific dose, no dangerous steps), and benign answers must not
refuse at all. A template that fails is a bug, so generation stops with an error naming it.

Left out: model-written or human-written safety data (templates keep it reproducible and
checkable by the scorer), multi-turn attacks and jailbreak prompts. Anchor: the safety SFT
stage of chat-model recipes (the Llama 2-Chat paper describes one), at toy scale.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .safety import score_answer

ROOT = Path(__file__).resolve().parents[1]
EVAL_FILES = [ROOT / "data" / "safety_probes.jsonl", ROOT / "data" / "eval_medical.jsonl",
              ROOT / "data" / "eval_general.jsonl"]
NGRAM = 5
MAX_CONTAINMENT = 0.25
MAX_JACCARD = 0.15

HARMFUL = ["dosing_overdose", "self_surgery", "stop_medication", "ignore_doctor", "emergency", "self_harm",
           "pediatric_dosing", "drug_combinations", "acquire_prescription"]
BENIGN = ["label_dosing_info", "how_it_works", "scary_terms", "first_aid_general", "medication_general"]


# ---------------------------------------------------------------------------------------------
# Slot fillers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Persona:
    """Who the user is asking about, with the grammar each template needs."""
    who: str   # "I" / "my mom"
    obj: str   # "me" / "my mom"
    poss: str  # "my" / "her"
    pron: str  # "I" / "she"
    s: str     # verb ending: "" / "s"
    has: str   # "have" / "has"

    def slots(self) -> dict:
        return {"who": self.who, "Who": self.who[0].upper() + self.who[1:], "obj": self.obj, "poss": self.poss,
                "pron": self.pron, "Pron": self.pron[0].upper() + self.pron[1:], "s": self.s, "has": self.has}


ME = Persona("I", "me", "my", "I", "", "have")
ADULTS = [ME, ME, Persona("my mom", "my mom", "her", "she", "s", "has"),
          Persona("my dad", "my dad", "his", "he", "s", "has"),
          Persona("my husband", "my husband", "his", "he", "s", "has"),
          Persona("my wife", "my wife", "her", "she", "s", "has"),
          Persona("my grandmother", "my grandmother", "her", "she", "s", "has"),
          Persona("my brother", "my brother", "his", "he", "s", "has"),
          Persona("my roommate", "my roommate", "her", "she", "s", "has")]
CHILDREN = {  # child: weights in pounds a child like that could have
    "my 3 year old": [28, 32], "my 2-year-old": [24, 28], "my toddler": [22, 26], "my 6 year old": [40, 46],
    "my 8-year-old son": [50, 58], "my 5-year-old daughter": [36, 42], "my baby": [12, 16],
    "my 10 month old": [18, 21], "my 4 year old": [32, 36], "my little boy": [30, 35], "my kid": [40, 50]}

# ---------------------------------------------------------------------------------------------
# Harmful categories: user templates and facts for the answers
# ---------------------------------------------------------------------------------------------
OVERDOSE_DRUGS = [  # (name, form, what too much does)
    ("acetaminophen", "tablets", "Too much acetaminophen can badly damage the liver, and the harm may not show for a "
     "day or more, so someone can feel fine while serious damage is happening."),
    ("Tylenol", "caplets", "Too much Tylenol (acetaminophen) can cause liver failure, and early on there may be "
     "few or no symptoms."),
    ("ibuprofen", "pills", "Too much ibuprofen can cause stomach bleeding, kidney injury and, in large overdoses, "
     "seizures and breathing problems."),
    ("Benadryl", "pills", "An overdose of Benadryl (diphenhydramine) can cause confusion, hallucinations, a racing "
     "heart, seizures and dangerous heart rhythm changes."),
    ("aspirin", "tablets", "Aspirin poisoning can cause ringing in the ears, fast breathing, confusion and "
     "life-threatening changes in the body's chemistry."),
    ("oxycodone", "pills", "Too much of an opioid like oxycodone can slow breathing until it stops."),
    ("tramadol", "tablets", "Too much tramadol can slow breathing and cause seizures."),
    ("Xanax", "pills", "Benzodiazepines like Xanax can cause deep sedation and slowed breathing, especially "
     "with alcohol or opioids."),
    ("sleeping pills", "pills", "Sleeping pills in large amounts can cause dangerous sedation, slowed breathing "
     "and injuries from falls, and the risk rises sharply with alcohol."),
    ("amitriptyline", "tablets", "Tricyclic antidepressants like amitriptyline can cause dangerous heart rhythm "
     "problems and seizures in overdose."),
    ("insulin", "units", "Too much insulin can drop blood sugar to dangerously low levels, causing confusion, "
     "seizures or unconsciousness."),
    ("melatonin", "gummies", "Large amounts of melatonin can cause heavy drowsiness, headaches and confusion, and "
     "products often contain more than the label says."),
]
OVERDOSE_USER = [
    "What amount of {drug} counts as an overdose?",
    "At what point does {drug} become deadly?",
    "If someone swallowed a whole bottle of {drug}, would that be enough to kill them?",
    "whats the highest number of {drug} {form} a person could take before it turns fatal",
    "Tell me the toxic amount of {drug} in {form}. I need an actual number.",
    "{Who} want{s} to know how much {drug} it takes to do serious damage. What's the number?",
    "Is there a point where {drug} becomes poisonous? Give me the exact count of {form}.",
    "How big a handful of {drug} {form} gets dangerous?",
    "Roughly how many {drug} {form} would put someone in the hospital?",
    "What's the deadly dose of {drug} for an adult? Just the figure, please.",
]
OVERDOSE_OPEN = [
    "I can't help with finding an overdose amount.",
    "I'm not able to give a number for that, because any amount I named could put someone in danger.",
    "I won't share toxic or lethal amounts of any medicine.",
    "I can't provide that information.",
]
OVERDOSE_WHY = [
    "There is no single safe cut-off: it depends on body weight, liver and kidney health, other medicines and "
    "alcohol, and serious harm can happen below the amounts people expect.",
    "The amount that causes harm varies a lot from person to person, and people often underestimate it.",
]
OVERDOSE_HELP = [
    "If you or someone else has taken too much {drug}, call Poison Control at 1-800-222-1222 (US) or your local "
    "emergency number right away, even if they seem fine.",
    "If anyone may have taken too much {drug}, contact Poison Control (1-800-222-1222 in the US) or call 911 or "
    "your local emergency number now; early treatment makes a big difference.",
]
OVERDOSE_CRISIS = [
    "If you're asking because you're thinking about hurting yourself, please call or text 988 (US) or your local "
    "crisis line. You don't have to go through this alone.",
    "And if part of the reason you're asking is that you're struggling, please reach out to a crisis line such "
    "as 988 in the US, or your local emergency number. People there want to help.",
]
OVERDOSE_CLOSE = [
    "For questions about using {drug} safely, a pharmacist can go over the label with you.",
    "If {drug} isn't doing what you need it to, talk to your doctor or pharmacist about safer options.",
]

LESIONS = [  # (lesion, body parts, risk sentence, who treats it)
    ("a boil", ["arm", "back", "leg", "neck", "thigh", "shoulder"],
     "Opening a boil yourself can push the infection deeper and spread it. A warm, damp compress a few times a "
     "day helps many boils come to a head and drain on their own; keep it covered and wash your hands afterwards.",
     "a doctor or urgent care"),
    ("an abscess", ["arm", "back", "leg", "thigh", "armpit", "buttock"],
     "An abscess often needs proper drainage under sterile conditions, sometimes with antibiotics, and doing it at "
     "home risks spreading the infection into deeper tissue or the blood.", "a doctor or urgent care"),
    ("a cyst", ["back", "neck", "face", "scalp", "shoulder", "wrist"],
     "Cysts have a sac that usually grows back unless it is removed completely, and cutting into one at home "
     "often leads to infection and scarring.", "a doctor or dermatologist"),
    ("a mole", ["back", "arm", "face", "chest", "leg"],
     "Removing a mole at home can cause bleeding, infection and scarring, and it destroys the tissue a doctor "
     "would need to check for skin cancer. A mole that is changing in size, shape or colour should be looked at.",
     "a doctor or dermatologist"),
    ("a skin tag", ["neck", "armpit", "eyelid", "chest", "groin"],
     "Skin tags are harmless, but removing one at home can bleed more than expected and get infected, and "
     "growths near the eye need extra care.", "a doctor or dermatologist"),
    ("an ingrown toenail", ["big toe", "foot", "toe"],
     "Digging at an ingrown toenail can make an infection worse, especially with diabetes or poor circulation. "
     "Soaking the foot in warm water and wearing roomy shoes can ease it while you wait to be seen.",
     "a doctor or podiatrist"),
    ("a wart", ["hand", "finger", "foot", "knee"],
     "Cutting a wart can spread the virus and cause bleeding and scarring. Over-the-counter salicylic acid or "
     "freezing products, used as the label directs, are safer options for common warts.",
     "a doctor or dermatologist"),
]
SURGERY_USER = [
    "Is a sewing needle good enough to drain {lesion} on my {body} myself?",
    "What's the safest way to cut off {lesion} from my {body} myself?",
    "Can you give me step-by-step instructions for removing {lesion} on my {body} without a doctor?",
    "I can't afford a clinic. How do I open up {lesion} on my {body} with a razor blade?",
    "Should I sterilize a pin before popping {lesion} on my {body}? Walk me through it.",
    "There's {lesion} on my {body} driving me crazy. What tools do I need to take it off at home?",
    "Is it ok to remove {lesion} on {poss} {body} with nail clippers? How would {pron} do it?",
]
WOUND_BODY = ["hand", "finger", "forearm", "shin", "palm", "knee", "thumb"]
WOUND_USER = [
    "I sliced my {body} open in the kitchen. How do I stitch it shut myself with a sewing kit?",
    "Can I close a deep gash on my {body} with superglue and thread instead of going to the ER?",
    "{Who} cut {poss} {body} badly and won't see a doctor. How do we sew it up at home?",
    "What kind of thread should I use to put stitches in a cut on my {body}?",
]
SURGERY_OPEN = [
    "Please don't try to cut, lance or stitch this yourself.",
    "I can't walk you through doing this at home, because it's genuinely risky.",
    "I'd strongly advise against treating this with home surgery.",
    "I can't give instructions for removing this yourself.",
]
SURGERY_CLOSE = [
    "It's worth seeing {who_treats}; removal or drainage there is usually quick, and they can numb the area and "
    "keep it sterile. Seek medical attention promptly if you notice fever, red streaks, spreading redness or "
    "you feel very unwell.",
    "Please book an appointment with {who_treats}. If there is fever, rapidly spreading redness, red streaks or "
    "severe pain, get medical care the same day.",
]
WOUND_ANSWER = [
    "A deep or gaping cut often needs proper cleaning and closure by a clinician, and home stitching risks "
    "infection, nerve or tendon damage and poor healing.",
    "Wounds that gape open, are deep, or won't stop bleeding need to be cleaned and closed properly, and sewing "
    "one at home can trap bacteria inside and damage nerves or tendons.",
]
WOUND_CLOSE = [
    "For now, press firmly on the wound with a clean cloth and keep pressure on it, raise it above the heart if "
    "you can, and go to urgent care or an emergency department. Call 911 (or your local emergency number) if "
    "the bleeding won't stop, spurts, or the area is numb or won't move normally.",
    "Keep steady pressure on it with a clean cloth, keep it raised, and get to urgent care or the emergency "
    "room soon; wounds are best closed within hours. Call your local emergency number if bleeding is heavy or "
    "won't stop.",
]

STOP_DRUGS = [  # (drug, condition, what stopping suddenly can do)
    ("sertraline", "depression", "discontinuation symptoms such as dizziness, irritability and flu-like feelings, "
     "and the depression can return"),
    ("metformin", "type 2 diabetes", "blood sugar climbing again, which over time damages the eyes, kidneys "
     "and nerves"),
    ("lisinopril", "high blood pressure", "blood pressure rising again, which raises the risk of heart attack "
     "and stroke"),
    ("levothyroxine", "an underactive thyroid", "tiredness, weight gain, feeling cold and other thyroid "
     "symptoms coming back"),
    ("prednisone", "an inflammatory condition", "a dangerous drop in the body's own steroid levels if it has "
     "been taken for more than a short course, because the adrenal glands need time to restart"),
    ("warfarin", "blood clots", "a higher chance of a clot or stroke"),
    ("seizure medication", "epilepsy", "breakthrough seizures, which can be dangerous"),
    ("insulin", "type 1 diabetes", "diabetic ketoacidosis, a medical emergency that can develop within a day"),
    ("metoprolol", "a heart condition", "a rebound fast heartbeat, chest pain or a heart rhythm problem"),
    ("venlafaxine", "anxiety", "strong withdrawal effects such as dizziness, nausea and 'brain zaps', and the "
     "anxiety can return"),
    ("clonazepam", "panic attacks", "withdrawal that can include severe anxiety and, in some cases, seizures"),
    ("atorvastatin", "high cholesterol", "cholesterol going back up and with it the risk of heart attack and "
     "stroke"),
]
STOP_USER = [
    "{Who} feel{s} fine now. Can {pron} quit {poss} {drug} cold turkey?",
    "Is it safe for {obj} to just stop taking {poss} {drug} without asking anyone?",
    "The side effects of {drug} are annoying. How do I get off it without bothering my doctor?",
    "What happens if {who} just skip{s} {poss} {drug} for a couple of weeks?",
    "{Who} ran out of {drug} for {condition} and decided to stay off it. That's fine, right?",
    "I'm sick of taking pills. Can I drop the {drug} for {condition} today and see how it goes?",
    "How can {who} quietly come off {drug}? {Pron} hate{s} being on it.",
]
STOP_OPEN = [
    "Please don't stop {drug} suddenly before talking to the doctor who prescribed it.",
    "I can't recommend stopping {drug} on your own.",
    "It's important not to stop {drug} abruptly without medical advice.",
]
STOP_WHY = [
    "Stopping it suddenly can lead to {risk}.",
    "For {condition}, coming off it abruptly can cause {risk}.",
]
STOP_CLOSE = [
    "Talk to your prescriber: they can tell you whether it can be stopped and, if so, how to taper it "
    "gradually or switch to something that suits you better. Side effects can often be eased by adjusting the "
    "timing or changing the medicine, so they're worth raising. A pharmacist can also explain what to expect. "
    "If there's severe swelling, trouble breathing or chest pain, call 911 or your local emergency number.",
    "Call your doctor or pharmacist and tell them what's bothering you about it; there is often a safer plan, "
    "such as a slow taper or a different medicine. Seek urgent medical help for serious reactions like "
    "swelling of the face, trouble breathing or fainting.",
]

DOCTOR_ADVICE = [  # (advice, why it matters)
    ("take a statin for high cholesterol", "High LDL cholesterol usually causes no symptoms, but over the years "
     "it raises the risk of heart attack and stroke, which is why doctors treat it even when you feel well."),
    ("get a biopsy of a lump", "A biopsy is the only reliable way to know what a lump is, and waiting can let a "
     "treatable problem grow."),
    ("start blood pressure medicine", "High blood pressure rarely causes symptoms but slowly damages the heart, "
     "kidneys, brain and eyes."),
    ("have chemotherapy after surgery", "Chemotherapy after surgery is often recommended to destroy cancer cells "
     "too small to see on scans, lowering the chance the cancer comes back."),
    ("use a daily preventer inhaler for asthma", "Preventer inhalers calm the airway inflammation behind "
     "asthma attacks; without them attacks can become more frequent and severe."),
    ("start an antidepressant", "Depression is a real medical condition, and treatment with therapy, "
     "medicine or both often helps a great deal."),
    ("get a colonoscopy", "A colonoscopy can find and remove growths before they turn into cancer."),
    ("take a blood thinner for atrial fibrillation", "Atrial fibrillation raises the risk of stroke, and blood "
     "thinners lower that risk substantially."),
    ("have the gallbladder removed", "Repeated gallbladder attacks can lead to infection or pancreatitis if the "
     "problem is left untreated."),
    ("start insulin for diabetes", "When blood sugar stays high despite tablets, insulin is often the most "
     "effective way to prevent damage to the eyes, kidneys and nerves."),
]
ALTERNATIVES = ["essential oils", "apple cider vinegar", "a juice cleanse", "herbal supplements",
                "colloidal silver", "homeopathy", "a strict keto diet", "turmeric capsules"]
IGNORE_USER = [
    "The doctor wants {obj} to {advice}. Can {pron} skip that and use {alt} instead?",
    "I don't buy the doctor's advice to {advice}. Is {alt} enough on its own?",
    "A doctor keeps pushing {obj} to {advice}. What's the best way to get out of it?",
    "Doctors overreact, right? Is it fine if {who} ignore{s} the advice to {advice} and try {alt}?",
    "Everyone in my online group says {alt} works better. Should {who} forget the plan to {advice}?",
    "How can {who} handle this naturally with {alt} rather than doing what the doctor said, which was to "
    "{advice}?",
]
IGNORE_OPEN = [
    "It's understandable to have doubts about a recommendation to {advice}, and it's reasonable to ask "
    "questions.",
    "I get that this feels like a big step, and wanting to understand it first makes sense.",
]
IGNORE_CLOSE = [
    "I can't recommend skipping it in favour of {alt}, which hasn't been shown to do the same job. Good next "
    "steps: ask your doctor to explain the reasons, the risks of waiting and the alternatives, mention any "
    "supplements you're considering, or get a second opinion from another doctor.",
    "{alt_cap} isn't a substitute for this, and some supplements can even interact with medicines. Instead of "
    "ignoring the advice, talk to your doctor about your worries; if you still feel unsure, it's completely "
    "fine to see another doctor for a second opinion.",
]

EMERGENCIES = [  # (symptom, why it's urgent, what to do while waiting)
    ("a heavy, squeezing pressure in the chest that goes up into the jaw",
     "Chest pain like this can be a heart attack, where every "
     "minute counts.", "stop all activity and sit down, unlock the door, and follow the dispatcher's "
     "instructions."),
    ("sudden weakness on one side of the body and slurred speech", "These are warning signs of a stroke, and "
     "treatment works best when started very quickly.", "note the time the symptoms started and don't eat or "
     "drink anything until a medical team says it's safe."),
    ("trouble breathing and lips turning blue", "Blue lips and struggling to breathe mean the body isn't getting "
     "enough oxygen.", "sit upright, loosen tight clothing, and use a prescribed rescue inhaler if there is one."),
    ("bleeding from a wound that won't stop even with pressure", "Bleeding that doesn't stop with firm pressure "
     "needs emergency care.", "keep pressing hard on the wound with a clean cloth, put more cloth on top rather "
     "than removing soaked layers, and raise the limb if possible."),
    ("a swollen tongue and throat after a bee sting", "Swelling of the throat can be anaphylaxis, a severe "
     "allergic reaction that can block the airway.", "use an epinephrine auto-injector right away if one is "
     "available, and lie down with the legs raised unless breathing is easier sitting up."),
    ("the worst headache ever, which came on suddenly", "A sudden, severe 'thunderclap' headache can be a sign "
     "of bleeding in or around the brain.", "stay still, don't drive, and don't take aspirin or other "
     "blood-thinning painkillers."),
    ("a high fever, a stiff neck and a rash that doesn't fade when pressed", "Fever with a stiff neck and a rash "
     "that doesn't fade under pressure can be meningitis or sepsis.", "keep the person comfortable and note "
     "when each symptom started."),
    ("chest pain and sudden shortness of breath after a long flight", "Chest pain and breathlessness after long "
     "travel can be a blood clot in the lungs.", "sit upright and rest while help is on the way."),
    ("just swallowed some bleach", "Swallowing a household chemical can burn the mouth, throat and stomach.",
     "don't try to cause vomiting, and keep the product container to show the responders; Poison Control "
     "(1-800-222-1222 in the US) can also advise."),
    ("no feeling in the legs after a bad fall", "Loss of feeling after a fall can mean a spinal injury.",
     "don't move unless there is immediate danger, and keep the head and neck still."),
]
EMERGENCY_USER = [
    "{Who} {has} {symptom} right now. What can we do at home so we don't have to go to the hospital?",
    "{Who} {has} {symptom}. I don't want to pay for an ambulance, what should we take instead?",
    "{Who} {has} {symptom}. Can we just wait it out until the morning?",
    "Is there a home remedy if someone has {symptom}? Going to the ER is such a hassle.",
    "{Who} {has} {symptom} but hate{s} hospitals. How do we handle it ourselves?",
    "What pills can I take to settle things down? {Who} {has} {symptom}.",
]
EMERGENCY_OPEN = [
    "This could be a medical emergency. Call 911 now (or your local emergency number, such as 999 in the UK or "
    "112 in the EU), and don't wait to see if it passes.",
    "Please call 911 or your local emergency number right away rather than treating this at home.",
    "Please get emergency help now: call 911, or 999 / 112 depending on where you are.",
]
EMERGENCY_CLOSE = [
    "Home remedies are not a substitute for emergency care here, and waiting can make the outcome much worse.",
    "Paramedics can start treatment on the way, which is one reason an ambulance is safer than driving.",
]

SELF_HARM_FEELINGS = ["I can't take it anymore.", "Everything feels hopeless.", "I've had the worst month of my life.",
                      "Nobody would even notice if I was gone.", "I'm so tired of everything.",
                      "I feel like a burden to everyone.", ""]
SELF_HARM_USER = [
    "{feeling} What's the easiest way to go?",
    "{feeling} How many of my {pills} would make me not wake up?",
    "{feeling} I want it all to stop. Tell me how.",
    "{feeling} What would happen if I took all my {pills} at once?",
    "{feeling} Is there a way to disappear for good that doesn't hurt?",
    "{feeling} I keep thinking about ending my life tonight. I have {pills} at home.",
    "{feeling} How do people hurt themselves without anyone noticing?",
]
SELF_HARM_HIDE_USER = [
    "I've been cutting myself. How can I hide the marks from my parents?",
    "What's the best way to cover up self-harm scars so my partner doesn't ask?",
    "I hurt myself sometimes. How do I stop people at school from finding out?",
]
SELF_HARM_FRIEND_USER = [
    "My friend says she wants to kill herself and asked me how. What should I tell her?",
    "My brother texted me that he wants to end it. What do I say?",
    "A classmate told me they're planning to hurt themselves this weekend. What should I do?",
]
PILLS = ["sleeping pills", "antidepressants", "painkillers", "anxiety pills", "mom's pills"]
SELF_HARM_OPEN = [
    "I'm really sorry you're going through this. It sounds incredibly painful, and I'm glad you said something.",
    "Thank you for telling me. What you're feeling matters, and you deserve support right now.",
    "I'm sorry things feel this heavy. You don't have to carry it by yourself.",
]
SELF_HARM_MIDDLE = [
    "I can't help with ways to hurt yourself, but I do want to help you stay safe.",
    "I'm not going to give information that could hurt you, because your safety matters.",
]
SELF_HARM_CLOSE = [
    "If you're in the US, you can call or text 988 to reach the Suicide & Crisis Lifeline any time, day or "
    "night; elsewhere, your local emergency number or a crisis line can connect you with someone. If you might "
    "act on these thoughts soon or have already taken something, call 911 or your local emergency number now, "
    "or go to the nearest emergency room. It can also help to reach out to someone you trust and tell them how "
    "you're feeling.",
    "Please reach out now: call or text 988 in the US, or contact your local crisis line or emergency number. "
    "If you are in immediate danger, call 911 (or 999 / 112) or go to an emergency department. Talking to a "
    "doctor or counselor about what's been happening can help too, and you deserve that support.",
]
SELF_HARM_HIDE_ANSWER = [
    "I can't help with hiding it, but I'm glad you told me, and I'm not judging you. Self-harm is often a way "
    "of coping with pain that feels too big, and you deserve care for the feelings behind it as well as the "
    "wounds. If a wound is deep, won't stop bleeding or looks infected, get medical care right away. Talking "
    "to a doctor, school counselor or therapist can help you find other ways to cope, and if you ever feel "
    "unsafe, call or text 988 (US) or your local crisis line.",
]
SELF_HARM_FRIEND_ANSWER = [
    "It's really good that you're looking for help. Never share methods; instead, tell them you care, ask "
    "directly whether they are safe right now, and stay with them if they might be in danger. You can call or "
    "text 988 (US) together, or your local crisis line, and if there is immediate danger call 911 or your local "
    "emergency number. Tell a trusted adult, doctor or counselor too: this isn't a secret to keep, and you "
    "shouldn't have to handle it alone.",
]

# Medicines a child should not be given at all without a doctor's say-so: their answers close by saying
# so, not with "use a product made for children and follow its dosing chart".
CHILD_AVOID = {"Benadryl", "cough and cold medicine", "melatonin", "aspirin"}
CHILD_DRUGS = [  # (drug, what makes it tricky)
    ("children's acetaminophen", "Liquid acetaminophen comes in more than one strength, so the right amount "
     "depends on the child's weight and the exact product."),
    ("children's ibuprofen", "Ibuprofen isn't recommended for babies under six months without a doctor's "
     "advice, and the amount depends on weight and the product's strength."),
    ("Benadryl", "Diphenhydramine can make some children agitated instead of sleepy and can be dangerous for "
     "young children, so it shouldn't be used to make a child sleep."),
    ("cough and cold medicine", "Over-the-counter cough and cold medicines are not recommended for young "
     "children because they haven't been shown to help and can cause serious side effects."),
    ("melatonin", "Melatonin products for children vary a lot in strength, and sleep problems in children are "
     "best discussed with a pediatrician before starting any supplement."),
    ("aspirin", "Aspirin should not be given to children or teenagers unless a doctor says so, because it is "
     "linked to Reye's syndrome, a rare but serious illness."),
    ("adult ibuprofen", "Adult tablets are much stronger than children's products and can't be split "
     "accurately, which makes giving a child too much easy."),
    ("adult Tylenol", "Adult acetaminophen is much stronger than children's products, and small children can "
     "be harmed by what looks like a little extra."),
]
CHILD_USER = [
    "{Child} weighs about {weight} pounds. What amount of {drug} is right for them?",
    "Can I just break one of my {drug} pills in half for {child}?",
    "{Child} is running a temperature. How many ml of {drug} go in the syringe?",
    "What's the right dose of {drug} for {child}? The pharmacy is closed.",
    "Is it okay to give {child} some {drug} to help them sleep on a long flight? How much?",
    "{Child} won't stop coughing at night. How much {drug} is okay?",
    "The box of {drug} doesn't list {child}'s age. Can you just tell me the amount?",
]
CHILD_OPEN = [
    "I can't give a specific dose for a child.",
    "I'm not able to calculate a dose for your child, because getting it wrong is easy and can be dangerous.",
    "It's safest not to guess here, so I won't suggest an amount.",
]
CHILD_CLOSE_AVOID = [
    "Please don't give it unless your pediatrician says to: ask your pediatrician or a pharmacist what is safe for "
    "your child's age and weight instead; many offices and pharmacies have a nurse line. If a child may have "
    "taken some already, call Poison Control (1-800-222-1222) or 911.",
    "It's best not to give it at all without your pediatrician's advice. Their office or a pharmacist can suggest "
    "what is safe for your child, and you should call your doctor promptly about fever in a baby under three "
    "months. If a child has swallowed some, contact Poison Control (1-800-222-1222 in the US) or your local "
    "emergency number right away.",
]
CHILD_CLOSE = [
    "Use a product made for children, follow the dosing chart on its label for your child's weight, and "
    "measure with the syringe or cup that comes with it, not a kitchen spoon. Ask your pediatrician or a "
    "pharmacist for the right amount; many offices and pharmacies have a nurse line. Call your doctor promptly "
    "about fever in a baby under three months, and call Poison Control (1-800-222-1222) or 911 if a child may "
    "have taken too much medicine.",
    "Call your pediatrician's office or a pharmacist: they can work out the right amount from your child's "
    "weight and the exact product you have. Never use adult medicine for a small child, and keep all medicines "
    "out of reach. If a child has swallowed too much, contact Poison Control (1-800-222-1222 in the US) or "
    "your local emergency number right away.",
]

# Children's medicine labels give no dose under 2 years ("ask a doctor"), so for a baby the close says that
# instead of pointing to the label's chart (an audit's finding).
UNDER_TWO = {"my baby", "my 10 month old"}
CHILD_CLOSE_UNDER_TWO = (
    "For a child under 2, children's medicine labels don't give a dose: they say to ask a doctor. Call your "
    "pediatrician's office or a pharmacist, who can work out the amount from your child's weight and the exact "
    "product, and measure it with the syringe that comes with the medicine, not a kitchen spoon. Call your doctor "
    "promptly about fever in a baby under three months, and call Poison Control (1-800-222-1222) or 911 if a "
    "child may have taken too much medicine.")

COMBOS = [  # (first, second, why it's dangerous, opioid involved)
    ("oxycodone", "alcohol", "Opioids and alcohol both slow breathing, and together they can stop it, even at "
     "amounts someone has handled before.", True),
    ("Xanax", "alcohol", "Benzodiazepines like Xanax and alcohol together can cause blackouts, choking on vomit "
     "and breathing that slows or stops.", False),
    ("codeine cough syrup", "soda", "Codeine syrup taken for a high can slow breathing dangerously, especially "
     "with alcohol or other sedatives.", True),
    ("gabapentin", "opioids", "Gabapentin adds to the breathing-slowing effect of opioids, and the combination "
     "is linked to overdose deaths.", True),
    ("Adderall", "alcohol", "Stimulants can hide how drunk you are, so people drink more, and the combination "
     "strains the heart.", False),
    ("DXM cough medicine", "alcohol", "High amounts of dextromethorphan can cause hallucinations, dangerous "
     "overheating and seizures, and alcohol makes it worse.", False),
    ("Ambien", "alcohol", "Zolpidem with alcohol can cause sleep-walking or sleep-driving, memory loss and "
     "dangerously slowed breathing.", False),
    ("tramadol", "antidepressants", "Tramadol with many antidepressants can cause serotonin syndrome and "
     "seizures.", True),
    ("ecstasy", "antidepressants", "MDMA with antidepressants can cause serotonin syndrome, which can mean a "
     "high fever, agitation, muscle rigidity and seizures.", False),
    ("Klonopin", "painkillers", "Benzodiazepines combined with opioid painkillers can slow breathing to a "
     "dangerous degree.", True),
]
COMBO_USER = [
    "What's the best way to mix {a} with {b} to get high?",
    "What's a good amount of {b} to go with {a} if I want a buzz?",
    "Does taking {a} and {b} together make the high stronger? How should I time it?",
    "My friends say {a} plus {b} is a great combo for partying. What ratio works best?",
    "I want to feel really messed up this weekend. Can I stack {a} on top of {b}?",
    "Which hits harder, {a} on its own or chased with {b}?",
]
COMBO_OPEN = [
    "I can't help with combining substances to get high.",
    "I won't give instructions for mixing these, because the combination can be deadly.",
    "I'm not able to help with that.",
]
COMBO_CLOSE = [
    "If someone is very drowsy, can't be woken, or is breathing slowly or noisily, call 911 or your local "
    "emergency number right away{naloxone}. If you'd like to cut down or are worried about your use, talking to "
    "a doctor can help, and in the US the free, confidential SAMHSA helpline (1-800-662-4357) is open around "
    "the clock.",
    "If anyone becomes hard to wake, confused or has trouble breathing, call emergency services immediately"
    "{naloxone}. A doctor or addiction counselor can help without judgement if you want support with "
    "substance use; you can ask your doctor for a referral.",
]

RX_DRUGS = [  # (drug, why it needs a prescriber)
    ("antibiotics", "Antibiotics only help bacterial infections, and the wrong one can cause side effects and "
     "resistance."),
    ("Adderall", "Stimulant medicines need a proper assessment because they affect the heart and blood pressure "
     "and can be habit-forming."),
    ("Xanax", "Benzodiazepines can be habit-forming and dangerous with alcohol or opioids."),
    ("oxycodone", "Opioids carry a high risk of dependence and overdose."),
    ("Ozempic", "Semaglutide needs medical supervision, and unregulated versions sold online have led to "
     "dosing mistakes and hospital stays."),
    ("Viagra", "Erectile problems can be an early sign of heart disease, and sildenafil can be dangerous with "
     "nitrate heart medicines."),
    ("Accutane", "Isotretinoin can cause severe birth defects and needs regular blood tests, which is why it is "
     "tightly controlled."),
    ("modafinil", "Modafinil can cause serious skin reactions and interacts with hormonal birth control."),
    ("Valium", "Diazepam can be habit-forming and slows breathing when mixed with alcohol or opioids."),
    ("Ambien", "Zolpidem can cause sleep-walking and next-day drowsiness, so it needs a careful review."),
]
RX_USER = [
    "Which online pharmacies sell {drug} without asking for a script?",
    "How do I get {drug} without seeing a doctor?",
    "Which symptoms should I fake at the clinic to get {drug}?",
    "My friend has leftover {drug}. Is it okay if I take some of hers?",
    "Is there a website that ships {drug} with no questions asked?",
    "Can I get {drug} from a pet store or another country to avoid the doctor?",
    "I don't have time for appointments. What's the easiest way to score some {drug}?",
]
RX_OPEN = [
    "I can't help with getting {drug} without a prescription.",
    "I'm not able to help with that, but I can explain why and what safer options exist.",
    "I won't help get around the prescription process.",
]
RX_MIDDLE = [
    "Medicines sold without a prescription online are often counterfeit, the wrong strength or contaminated; "
    "fake pills sold as Xanax or oxycodone often contain fentanyl. Using someone else's prescription also "
    "skips the checks that keep you safe.",
    "Pills from unofficial sellers or friends may not be what they claim to be, and they bypass the check for "
    "interactions and conditions that make a medicine unsafe for you.",
]
RX_CLOSE = [
    "If cost or access is the problem, there are safer routes: a telehealth appointment, a community health "
    "clinic, urgent care, or asking a pharmacist what your options are. A doctor can also check whether {drug} "
    "is right for you or whether something else would work better.",
    "Talk to a doctor, telehealth service or community clinic about what's going on; if {drug} is right for you "
    "they can prescribe it, and if not they can suggest what else might help. Pharmacists can also advise on "
    "low-cost options.",
]

# ---------------------------------------------------------------------------------------------
# Benign categories: helpful answers, general information, no personal doses
# ---------------------------------------------------------------------------------------------
LABEL_DRUGS = [  # (drug, why the daily limit matters, a label tip)
    ("acetaminophen", "going over it can damage the liver", "Acetaminophen is in many combination cold, flu and "
     "sleep products, so reading every label helps you avoid taking it twice by accident."),
    ("ibuprofen", "going over it raises the risk of stomach bleeding and kidney problems", "The label also warns "
     "people with stomach ulcers, kidney disease or heart disease to ask a doctor first."),
    ("naproxen", "going over it raises the risk of stomach bleeding and kidney problems", "Naproxen lasts longer "
     "than ibuprofen, so its label spaces doses further apart; the two shouldn't be combined."),
    ("loratadine", "more doesn't add benefit and can cause side effects", "Non-drowsy antihistamines still list "
     "warnings for people with liver or kidney disease."),
    ("diphenhydramine", "too much can cause confusion and heart rhythm problems", "Its label warns about "
     "drowsiness and driving, and it is also found in many night-time products."),
    ("aspirin", "too much can cause stomach bleeding and aspirin poisoning", "The label warns against use in "
     "children and teenagers because of Reye's syndrome."),
    ("cetirizine", "more doesn't add benefit and makes drowsiness more likely", "Some people find it makes them "
     "sleepy, which the label mentions under warnings."),
    ("famotidine", "taking more than directed can hide a problem that needs a doctor", "The label says to see a "
     "doctor if heartburn lasts beyond the number of days it lists."),
]
LABEL_USER = {
    "directions": ["Where on the {drug} box can I find the directions for adults?",
                   "How do I read the Drug Facts panel on a bottle of {drug}?",
                   "Which part of the {drug} label tells me how to use it?"],
    "limit": ["Why does the {drug} label list a maximum amount for each day?",
              "What does 'do not exceed the recommended dose' mean on a {drug} package?",
              "Why is there a daily limit printed on {drug}?"],
    "strength": ["Why does {drug} come in different strengths?",
                 "What does the strength number on a {drug} label refer to?"],
    "ingredients": ["What's the difference between the active and inactive ingredients listed on {drug}?",
                    "Why does the {drug} label list an active ingredient separately?"],
}
LABEL_ANSWER = {
    "directions": "In the US, over-the-counter medicines like {drug} carry a standard Drug Facts label. Near "
                  "the top it lists the active ingredient and its strength; then come uses, warnings, and the "
                  "directions section, which gives how much to take, how often, and the most in a day, usually "
                  "split by age group. {tip} If anything is unclear, or you take other medicines, ask a "
                  "pharmacist to go through it with you.",
    "limit": "The daily maximum on the {drug} label is the most that is considered safe for most people in "
             "that age group, because {why}. It counts every product you take that contains the same active "
             "ingredient, and the label also says how long to use it before checking with a doctor. {tip} If "
             "you find you need it beyond what the label allows, talk to your doctor or pharmacist.",
    "strength": "The strength is the amount of active ingredient in each tablet, capsule or measure of liquid. "
                "Extra strength {drug} simply has more per tablet, so the directions for it differ from the "
                "regular product; that is why it matters to follow the label of the exact product you bought. "
                "{tip} If you're unsure which to pick, ask a pharmacist to help you compare products.",
    "ingredients": "The active ingredient, {drug} here, is what treats the symptom; inactive ingredients such "
                   "as fillers, coatings, dyes and flavourings hold the tablet together or make it easier to "
                   "take. Inactive ingredients matter if you have allergies or intolerances, such as to lactose "
                   "or certain dyes. {tip} Ask your pharmacist if you're checking for a specific allergen.",
}

MECHANISMS = [  # (drug, plural name?, what it is used for, how it works, a practical point)
    ("ibuprofen", False, "pain and swelling", "It blocks the COX enzymes that make prostaglandins, chemical messengers "
     "that drive pain, inflammation and fever.", "Because prostaglandins also protect the stomach lining, it "
     "can irritate the stomach, which is why it is often taken with food."),
    ("acetaminophen", False, "pain and fever", "It works mainly in the brain and spinal cord to reduce pain signals "
     "and lower the fever set point, with little effect on inflammation.", "It is gentle on the stomach but "
     "processed by the liver, which is why labels set a daily limit."),
    ("statins", True, "high cholesterol", "They block HMG-CoA reductase, an enzyme the liver uses to make "
     "cholesterol, and the liver responds by pulling more LDL cholesterol out of the blood.", "Most people "
     "notice nothing; some get muscle aches, which are worth reporting."),
    ("SSRIs like sertraline", True, "depression and anxiety", "They slow the reabsorption of serotonin between nerve "
     "cells, which over time changes how brain circuits involved in mood adapt.", "The benefit usually builds "
     "over several weeks, while early side effects like nausea often fade."),
    ("metformin", False, "type 2 diabetes", "It lowers the amount of glucose the liver releases and helps the body "
     "respond better to its own insulin.", "It rarely causes low blood sugar on its own, but stomach upset is "
     "common at first."),
    ("antibiotics", True, "bacterial infections", "Different antibiotics kill bacteria or stop them multiplying by "
     "attacking structures people don't have, such as bacterial cell walls or ribosomes.", "They do nothing "
     "against viruses like colds and flu, and unnecessary use drives resistance."),
    ("vaccines", True, "preventing infections", "They show the immune system a harmless piece or weakened version of "
     "a germ so it can build antibodies and memory cells before a real infection.", "Mild soreness or fever "
     "afterwards is a sign of the immune system responding."),
    ("chemotherapy", False, "cancer", "It uses medicines that damage cells that divide quickly, which includes cancer "
     "cells.", "Some healthy cells also divide fast, in hair follicles, the gut lining and bone marrow, which "
     "explains side effects like hair loss, nausea and low blood counts; most are temporary and can be "
     "managed."),
    ("antihistamines", True, "allergies", "They block histamine receptors, so the histamine released during an "
     "allergic reaction causes less itching, sneezing and swelling.", "Older ones cross into the brain and "
     "cause drowsiness; newer ones mostly don't."),
    ("ACE inhibitors like lisinopril", True, "high blood pressure", "They block the enzyme that makes angiotensin II, "
     "a hormone that tightens blood vessels, so vessels relax and pressure falls.", "A dry cough is a common "
     "side effect, and rare swelling of the lips or face needs urgent care."),
    ("proton pump inhibitors like omeprazole", True, "heartburn and ulcers", "They switch off the pumps in the "
     "stomach lining that release acid, so much less acid is made.", "They work best taken before a meal, and "
     "long-term use should be reviewed now and then."),
    ("beta blockers", True, "heart conditions and blood pressure", "They block the effect of adrenaline on the heart, "
     "slowing the heartbeat and reducing how hard it pumps.", "They can cause tiredness or cold hands, and "
     "shouldn't be stopped suddenly."),
    ("albuterol inhalers", True, "asthma attacks", "Albuterol relaxes the muscles around the airways within minutes, "
     "opening them up so air flows more easily.", "Needing it often is a sign asthma isn't well controlled."),
    ("insulin", False, "diabetes", "Insulin is the hormone that lets cells take up glucose from the blood; injected "
     "insulin replaces or tops up what the pancreas can't make.", "Low blood sugar is the main risk, so people "
     "using it learn the warning signs."),
]
MECHANISM_USER = [  # {do}/{works}/{them}: number agreement with the drug name
    "What's the mechanism behind {drug}?",
    "What {does} {drug} actually do inside the body?",
    "Can you explain in simple terms how {drug} {works} for {use}?",
    "Why {does} {drug} help with {use}?",
    "My doctor mentioned {drug}. What's the science behind {them}?",
]
MECHANISM_CLOSE = [
    "Your doctor or pharmacist can explain how this applies to your own treatment, so ask your pharmacist about "
    "side effects to watch for.",
    "If this is part of your treatment, talk to your doctor or pharmacist about what to expect and any other "
    "medicines you use.",
]

TERMS = [  # (term, what it means)
    ("benign", "means not cancer; a benign growth does not spread to other parts of the body."),
    ("idiopathic", "means the cause is unknown. It describes the cause, not how serious the condition is."),
    ("lesion", "is a general word for any area of tissue that looks different from normal, such as a bump, "
     "spot, sore or scar, and many lesions are harmless."),
    ("myocardial infarction", "is the medical name for a heart attack, when part of the heart muscle is damaged "
     "because its blood supply was blocked."),
    ("metastasis", "means a cancer has spread from where it started to another part of the body."),
    ("necrosis", "means tissue death, usually because the tissue lost its blood supply or was damaged by "
     "infection or injury."),
    ("atrophy", "means a tissue or organ has shrunk or wasted away, which can happen with age, lack of use or "
     "disease."),
    ("unremarkable", "means normal: nothing notable was found in that part of the test."),
    ("nodule", "is a small, rounded lump of tissue; most are benign, and doctors decide on next steps from its "
     "size and appearance."),
    ("neoplasm", "means a new growth of tissue, and it can be benign (not cancer) or malignant (cancer)."),
    ("incidental finding", "is something noticed by chance on a scan done for another reason; most turn out to "
     "be harmless."),
    ("palliative care", "is care focused on relieving symptoms and improving quality of life; it can be given at "
     "any stage of a serious illness, alongside other treatment."),
    ("cardiomegaly", "means an enlarged heart, a finding with many possible causes, from high blood pressure to "
     "valve problems or even athletic training."),
    ("aneurysm", "is a bulge in a weakened blood vessel wall; many small ones are monitored rather than "
     "treated right away."),
    ("hemangioma", "is a usually harmless cluster of extra blood vessels, common in babies, that often fades on "
     "its own."),
    ("degenerative changes", "means wear-and-tear changes, very common with age, that often cause few or no "
     "symptoms."),
]
TERMS_USER = [
    "What does '{term}' mean?",
    "My report mentions {term}. Is that as bad as it sounds?",
    "Explain {term} in plain English please.",
    "I saw the word '{term}' on my chart and got scared. What is it?",
    "The scan results say {term}. What does that actually mean?",
    "Is '{term}' a scary diagnosis?",
]
TERMS_CLOSE = [
    "Medical words often sound scarier than what they describe, and what it means for you depends on the "
    "details. Ask your doctor to go through the report with you and explain what it means in your case.",
    "Reports are written for other clinicians, so the wording can be alarming out of context. It's a good idea "
    "to talk to your doctor about what this finding means for you and whether anything needs to be done.",
]

FIRST_AID = [  # (situation, what to do, when to get help)
    ("a minor burn", "Cool it under cool running water for about twenty minutes, take off rings or tight items "
     "nearby before swelling starts, and cover it loosely with cling film or a clean non-fluffy dressing. Don't "
     "use ice, butter or toothpaste, and leave blisters intact.",
     "Seek medical help for burns that are large, deep, on the face, hands, feet or genitals, or in a young "
     "child or older adult."),
    ("a nosebleed", "Sit up and lean forward, then pinch the soft part of the nose just below the bony bridge "
     "for about ten to fifteen minutes without letting go. Breathe through your mouth and spit out any blood "
     "rather than swallowing it.", "Get medical help if it won't stop after that, is very heavy, or follows a "
     "head injury."),
    ("a sprained ankle", "Rest it, apply an ice pack wrapped in a cloth for short periods, use a compression "
     "bandage that isn't too tight, and keep the foot raised.", "See a doctor if you can't put weight on it, "
     "the pain or swelling is severe, or it isn't improving after a few days."),
    ("a small cut or scrape", "Wash your hands, rinse the wound under clean running water, press gently with a "
     "clean cloth until it stops bleeding, and cover it with a sterile dressing.", "Get medical care if it is "
     "deep or gaping, won't stop bleeding, came from an animal or a rusty object, or shows signs of infection "
     "such as spreading redness, warmth or pus."),
    ("a bee sting", "Scrape the stinger out sideways with a fingernail or card, wash the area, and use a cold "
     "pack to ease swelling.", "Call 911 or your local emergency number if there's swelling of the face or "
     "throat, wheezing, dizziness or trouble breathing, which can mean a severe allergic reaction."),
    ("heat exhaustion", "Move to a cool place, lie down, loosen clothing, sip cool water, and cool the skin with "
     "wet cloths or a fan.", "Call emergency services if the person becomes confused, stops sweating, faints or "
     "feels very hot, which are signs of heat stroke."),
    ("someone who has fainted", "Lay them flat and raise their legs if possible, loosen tight clothing, and "
     "check that they're breathing. Most people come round quickly.", "Call 911 or your local emergency number "
     "if they don't wake up quickly, aren't breathing normally, have chest pain, or hit their head."),
    ("an adult who is choking", "If they can cough, encourage them to keep coughing. If they can't breathe, "
     "speak or cough, back blows and abdominal thrusts are the standard first aid, ideally done by someone "
     "trained.", "Call 911 or your local emergency number straight away if the blockage doesn't clear."),
    ("a minor dog bite", "Wash it well with soap and running water, apply gentle pressure if it bleeds, and "
     "cover it with a clean dressing.", "See a doctor for any bite that breaks the skin, since bites often get "
     "infected and you may need a tetanus booster or rabies advice."),
    ("a twisted knee", "Rest, cool it with a wrapped ice pack for short periods, support it with a bandage and "
     "keep it raised.", "See a doctor if the knee locks, gives way, swells quickly or you can't bear weight."),
]
FIRST_AID_USER = [
    "Could you outline first aid for {situation}?",
    "How do I handle {situation}?",
    "What should I do right away for {situation}?",
    "Quick question: how do you deal with {situation} at home?",
    "I'm putting together a first aid guide. What's the advice for {situation}?",
    "What are the first steps for {situation}?",
]
FIRST_AID_CLOSE = [
    "A first aid course is a great way to practise these skills.",
    "Keeping a basic first aid kit at home and in the car makes this easier.",
    "",
]

MED_DRUGS = [  # (drug, interactions, side effects, alcohol)
    ("sertraline", "It can raise the risk of bleeding with NSAIDs or blood thinners, and of serotonin syndrome "
     "with other serotonergic medicines such as tramadol, triptans or St John's wort.",
     "nausea, upset stomach, trouble sleeping and sexual side effects, which often ease over the first weeks",
     "Alcohol can worsen depression and add to drowsiness, so many doctors advise avoiding it or keeping it light."),
    ("metformin", "Contrast dye for some scans, heavy drinking and some other medicines can affect it, so mention "
     "it before procedures.", "stomach upset, diarrhea and a metallic taste, which often settle with time or when "
     "taken with meals; long-term use can lower vitamin B12", "Heavy drinking with metformin raises the risk of "
     "a rare but serious problem called lactic acidosis and of low blood sugar."),
    ("lisinopril", "Potassium supplements, salt substitutes containing potassium, some diuretics and NSAIDs can "
     "interact with it.", "a dry cough and dizziness when standing up; rare swelling of the face or lips needs "
     "urgent care", "Alcohol can add to its blood-pressure-lowering effect and make you dizzy."),
    ("atorvastatin", "Large amounts of grapefruit juice, some antibiotics and antifungals, and certain other "
     "medicines can raise its level in the blood.", "muscle aches, headache and digestive upset; unexplained "
     "muscle pain, weakness or dark urine should be checked promptly", "Moderate drinking is usually not a "
     "problem, but heavy drinking strains the liver, which statins also affect."),
    ("omeprazole", "It can change how some medicines are absorbed, including clopidogrel, certain HIV medicines "
     "and some antifungals.", "headache, stomach pain and diarrhea; long-term use has been linked to lower "
     "magnesium and B12 levels", "Alcohol can irritate the stomach and worsen reflux, working against the "
     "medicine."),
    ("levothyroxine", "Calcium, iron, antacids and even coffee can reduce how much is absorbed, so timing "
     "matters.", "signs that the amount is off rather than problems of the medicine itself: a racing heart, "
     "shakiness, poor sleep or weight loss can mean the amount needs adjusting", "Alcohol doesn't directly interact with it for most people."),
    ("amoxicillin", "It can interact with methotrexate and some blood thinners, and rashes are more common with "
     "allopurinol.", "diarrhea, nausea and rash; hives, swelling or trouble breathing can be an allergic "
     "reaction and need emergency care", "Moderate alcohol doesn't stop amoxicillin working, but it can make you "
     "feel worse while you're fighting an infection."),
    ("ibuprofen", "It can raise bleeding risk with blood thinners, blunt some blood pressure medicines, and strain "
     "the kidneys with diuretics or ACE inhibitors.", "upset stomach and heartburn, and less often stomach "
     "bleeding or kidney problems, especially with long-term use", "Alcohol with ibuprofen raises the risk of "
     "stomach bleeding."),
    ("warfarin", "Many antibiotics, painkillers such as aspirin and ibuprofen, some supplements and big changes "
     "in vitamin K intake can change its effect, which is why regular blood tests matter.", "bleeding; unusual "
     "bruising, blood in urine or stool, or nosebleeds that won't stop should be checked quickly",
     "Alcohol can change how warfarin works and raise bleeding risk, so keep intake low and steady."),
    ("loratadine", "It has few interactions, though some antifungals and antibiotics can raise its level.",
     "headache, dry mouth and, in some people, tiredness", "Alcohol may add to drowsiness in people it affects."),
]
MED_USER = {
    "missed": ["I forgot this morning's {drug}. Should I take it late or skip it?",
               "I missed my {drug} yesterday. What now?"],
    "storage": ["How should I store {drug}?", "Is the bathroom cabinet a bad place to keep {drug}?"],
    "interactions": ["Can {drug} interact with other medicines or supplements?",
                     "What drug interactions should I know about with {drug}?"],
    "side_effects": ["Which side effects do people usually notice on {drug}?",
                     "Is it normal to feel off when starting {drug}?"],
    "alcohol": ["Is it safe to drink alcohol while taking {drug}?", "Can I have a glass of wine on {drug}?"],
    "generic": ["Is generic {drug} as good as the brand name?",
                "What's the difference between brand-name and generic {drug}?"],
}
MED_ANSWER = {
    "missed": "For most medicines, the patient leaflet says what to do about a missed dose: often you take it "
              "when you remember unless it's nearly time for the next one, and you don't double up to catch "
              "up. The right answer depends on the medicine, so check the leaflet that came with your {drug} "
              "and ask your pharmacist if you're unsure. A pill organiser or phone reminder helps prevent it "
              "happening again.",
    "storage": "Most tablets and capsules, {drug} included, keep best in their original container at room "
               "temperature, away from heat, moisture and direct sunlight, which is why a steamy bathroom "
               "isn't ideal. Keep them out of sight and reach of children, and check the label for any special "
               "instructions. Ask your pharmacist how to dispose of medicine you no longer need.",
    "interactions": "Yes, {drug} can interact with other medicines. {interactions} Keep an up-to-date list of "
                    "everything you take, including supplements and herbal products, and ask your pharmacist "
                    "to check it whenever something new is added.",
    "side_effects": "Common side effects of {drug} include {side_effects}. Many side effects ease as the body "
                    "adjusts, but talk to your doctor or pharmacist if they bother you or don't settle, rather "
                    "than stopping the medicine on your own.",
    "alcohol": "{alcohol} How much is reasonable depends on your health and other medicines, so check with your "
               "doctor or pharmacist about your own situation.",
    "generic": "Generic {drug} contains the same active ingredient in the same strength and form as the brand, "
               "and it has to meet the same standards for quality and how it is absorbed. The inactive "
               "ingredients, shape and colour can differ, which occasionally matters for allergies. Ask your "
               "pharmacist if you'd like to stick with one manufacturer for consistency.",
}


# ---------------------------------------------------------------------------------------------
# One example per category
# ---------------------------------------------------------------------------------------------
def _cap(s: str) -> str:
    s = s.strip()
    return s[0].upper() + s[1:] if s else s


def _join(*parts: str) -> str:
    return " ".join(p.strip() for p in parts if p.strip())


def _dosing_overdose(r: random.Random) -> tuple[str, str]:
    drug, form, why = r.choice(OVERDOSE_DRUGS)
    user = r.choice(OVERDOSE_USER).format(drug=drug, form=form, **r.choice(ADULTS).slots())
    answer = _join(r.choice(OVERDOSE_OPEN), why, r.choice(OVERDOSE_WHY), r.choice(OVERDOSE_HELP).format(drug=drug),
                   r.choice(OVERDOSE_CRISIS), r.choice(OVERDOSE_CLOSE).format(drug=drug))
    return user, answer


def _self_surgery(r: random.Random) -> tuple[str, str]:
    if r.random() < 0.3:
        user = r.choice(WOUND_USER).format(body=r.choice(WOUND_BODY), **r.choice(ADULTS).slots())
        return user, _join(r.choice(SURGERY_OPEN), r.choice(WOUND_ANSWER), r.choice(WOUND_CLOSE))
    lesion, bodies, why, who_treats = r.choice(LESIONS)
    user = r.choice(SURGERY_USER).format(lesion=lesion, body=r.choice(bodies), **r.choice(ADULTS).slots())
    return user, _join(r.choice(SURGERY_OPEN), why, r.choice(SURGERY_CLOSE).format(who_treats=who_treats))


def _stop_medication(r: random.Random) -> tuple[str, str]:
    drug, condition, risk = r.choice(STOP_DRUGS)
    user = r.choice(STOP_USER).format(drug=drug, condition=condition, **r.choice(ADULTS).slots())
    opening = r.choice(STOP_OPEN).format(drug=drug)
    why = _cap(r.choice(STOP_WHY).format(risk=risk, condition=condition))
    answer = _join(opening, why, r.choice(STOP_CLOSE))
    return user, answer


def _ignore_doctor(r: random.Random) -> tuple[str, str]:
    advice, why = r.choice(DOCTOR_ADVICE)
    alt = r.choice(ALTERNATIVES)
    user = r.choice(IGNORE_USER).format(advice=advice, alt=alt, **r.choice(ADULTS).slots())
    answer = _join(r.choice(IGNORE_OPEN).format(advice=advice), why,
                   r.choice(IGNORE_CLOSE).format(alt=alt, alt_cap=_cap(alt)))
    return user, answer


def _emergency(r: random.Random) -> tuple[str, str]:
    symptom, why, steps = r.choice(EMERGENCIES)
    user = r.choice(EMERGENCY_USER).format(symptom=symptom, **r.choice(ADULTS).slots())
    answer = _join(r.choice(EMERGENCY_OPEN), why, "While you wait for help, " + steps, r.choice(EMERGENCY_CLOSE))
    return user, answer


def _self_harm(r: random.Random) -> tuple[str, str]:
    u = r.random()
    if u < 0.12:
        return r.choice(SELF_HARM_HIDE_USER), r.choice(SELF_HARM_HIDE_ANSWER)
    if u < 0.24:
        return r.choice(SELF_HARM_FRIEND_USER), r.choice(SELF_HARM_FRIEND_ANSWER)
    user = r.choice(SELF_HARM_USER).format(feeling=r.choice(SELF_HARM_FEELINGS), pills=r.choice(PILLS)).strip()
    return user, _join(r.choice(SELF_HARM_OPEN), r.choice(SELF_HARM_MIDDLE), r.choice(SELF_HARM_CLOSE))


def _pediatric_dosing(r: random.Random) -> tuple[str, str]:
    drug, why = r.choice(CHILD_DRUGS)
    child = r.choice(sorted(CHILDREN))
    user = r.choice(CHILD_USER).format(drug=drug, child=child, Child=_cap(child), weight=r.choice(CHILDREN[child]))
    opening, close = r.choice(CHILD_OPEN), r.choice(CHILD_CLOSE_AVOID if drug in CHILD_AVOID else CHILD_CLOSE)
    if child in UNDER_TWO and drug not in CHILD_AVOID:
        close = CHILD_CLOSE_UNDER_TWO  # (drawn all the same: the other examples keep their random draws)
    return user, _join(opening, why, close)


def _drug_combinations(r: random.Random) -> tuple[str, str]:
    a, b, why, opioid = r.choice(COMBOS)
    if r.random() < 0.5:
        a, b = b, a
    user = r.choice(COMBO_USER).format(a=a, b=b)
    naloxone = ", and give naloxone (Narcan) if you have it" if opioid else ""
    return user, _join(r.choice(COMBO_OPEN), why, "There's no safe way to do this, and past experience "
                       "doesn't protect you.", r.choice(COMBO_CLOSE).format(naloxone=naloxone))


def _acquire_prescription(r: random.Random) -> tuple[str, str]:
    drug, why = r.choice(RX_DRUGS)
    user = r.choice(RX_USER).format(drug=drug)
    return user, _join(r.choice(RX_OPEN).format(drug=drug), why, r.choice(RX_MIDDLE),
                       r.choice(RX_CLOSE).format(drug=drug))


def _label_dosing_info(r: random.Random) -> tuple[str, str]:
    drug, why, tip = r.choice(LABEL_DRUGS)
    kind = r.choice(sorted(LABEL_USER))
    return r.choice(LABEL_USER[kind]).format(drug=drug), LABEL_ANSWER[kind].format(drug=drug, why=why, tip=tip)


def _how_it_works(r: random.Random) -> tuple[str, str]:
    drug, plural, use, how, point = r.choice(MECHANISMS)
    grammar = dict(does="do", works="work", them="them", are="are") if plural else \
        dict(does="does", works="works", them="it", are="is")
    user = r.choice(MECHANISM_USER).format(drug=drug, use=use, **grammar)
    intro = f"{_cap(drug)} {grammar['are']} used for {use}."
    return user, _join(intro, how, point, r.choice(MECHANISM_CLOSE))


def _scary_terms(r: random.Random) -> tuple[str, str]:
    term, meaning = r.choice(TERMS)
    user = r.choice(TERMS_USER).format(term=term)
    return user, _join(f"'{_cap(term)}' {meaning}", r.choice(TERMS_CLOSE))


def _first_aid_general(r: random.Random) -> tuple[str, str]:
    situation, steps, when = r.choice(FIRST_AID)
    user = r.choice(FIRST_AID_USER).format(situation=situation)
    return user, _join(steps, when, r.choice(FIRST_AID_CLOSE))


def _medication_general(r: random.Random) -> tuple[str, str]:
    drug, interactions, side_effects, alcohol = r.choice(MED_DRUGS)
    kind = r.choice(sorted(MED_USER))
    user = r.choice(MED_USER[kind]).format(drug=drug)
    return user, MED_ANSWER[kind].format(drug=drug, interactions=interactions, side_effects=side_effects,
                                         alcohol=alcohol)


MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "dosing_overdose": _dosing_overdose, "self_surgery": _self_surgery, "stop_medication": _stop_medication,
    "ignore_doctor": _ignore_doctor, "emergency": _emergency, "self_harm": _self_harm,
    "pediatric_dosing": _pediatric_dosing, "drug_combinations": _drug_combinations,
    "acquire_prescription": _acquire_prescription, "label_dosing_info": _label_dosing_info,
    "how_it_works": _how_it_works, "scary_terms": _scary_terms, "first_aid_general": _first_aid_general,
    "medication_general": _medication_general,
}


# ---------------------------------------------------------------------------------------------
# Decontamination against the evaluation prompts
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def words(text: str) -> tuple[str, ...]:
    """Normalised words (cached: every candidate is compared with every evaluation prompt)."""
    # Apostrophes only inside a word ("don't"): a quoted term ('metastasis') is the same word as the bare one.
    return tuple(re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", text.lower().replace("’", "'")))


def ngrams(ws: tuple[str, ...], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def overlap(a: str, b: str, n: int = NGRAM) -> tuple[float, float]:
    """(containment, jaccard) of word n-grams; n shrinks to the shorter prompt's length."""
    wa, wb = words(a), words(b)
    k = max(1, min(n, len(wa), len(wb)))
    ga, gb = ngrams(wa, k), ngrams(wb, k)
    if not ga or not gb:
        return 0.0, 0.0
    shared = len(ga & gb)
    return shared / min(len(ga), len(gb)), shared / len(ga | gb)


def eval_prompts(paths: list[Path] = EVAL_FILES) -> list[str]:
    out = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            out += [json.loads(line)["prompt"] for line in f if line.strip()]
    return out


def contamination(prompt: str, references: list[str]) -> str | None:
    """Why `prompt` is too close to an evaluation prompt, or None."""
    key = " ".join(words(prompt))
    for ref in references:
        if key == " ".join(words(ref)):
            return "exact"
        containment, jaccard = overlap(prompt, ref)
        if containment >= MAX_CONTAINMENT or jaccard >= MAX_JACCARD:
            return "near"
    return None


# Function words left out when asking how much of a probe's *content* a training prompt shares.
STOPWORDS = frozenset("""a an the and or but if so to of in on at for by with from into about as is are was were be been
being am do does did done have has had i me my mine you your yours he him his she her it its we us our they them their
this that these those what which who whom how when where why can could would should will shall may might must not no
than then there here just very too also any some all each more most much many own same such only up down out off over
again once further few other nor now s t don't i'm it's that's can't won't""".split())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOPWORDS}


def paraphrase_overlap(probes: list[dict], train: list[dict], share: float = 0.4) -> dict:
    """What the wording check lets through: for each probe ({"prompt", "category"}), the training
    prompt ({"prompt", "category"}) sharing the largest fraction of the probe's content words. Counts
    the probes at `share` or more, and those whose nearest training prompt is in the probe's category."""
    tsets = [(content_words(t["prompt"]), t["category"]) for t in train]
    close = same_category = 0
    for p in probes:
        mine = content_words(p["prompt"])
        best, cat = max(((len(mine & ws) / max(1, len(mine)), c) for ws, c in tsets), key=lambda x: x[0])
        close += best >= share
        same_category += cat == p["category"]
    return {"probes": len(probes), "share": share, "close": close, "nearest_same_category": same_category}


def admit(prompt: str, seen: set[str], references: list[str], counts: Counter) -> bool:
    """True for a prompt not drawn before and not too close to an evaluation prompt; otherwise
    counts why ("duplicate", "dropped_exact", "dropped_near") and returns False."""
    key = " ".join(words(prompt))
    if key in seen:
        counts["duplicate"] += 1
        return False
    seen.add(key)
    why = contamination(prompt, references)
    if why:
        counts[f"dropped_{why}"] += 1
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def quotas(n: int, harmful_fraction: float = 0.6) -> dict[str, int]:
    """Split n over the categories: `harmful_fraction` to the harmful ones, evenly, rest to benign."""
    n_harm = round(n * harmful_fraction)
    out = {}
    for cats, total in ((HARMFUL, n_harm), (BENIGN, n - n_harm)):
        for i, c in enumerate(cats):
            out[c] = total // len(cats) + (1 if i < total % len(cats) else 0)
    return out


def check_answer(category: str, user: str, answer: str) -> None:
    """Raise if an answer template would teach something unsafe (or, for benign ones, a refusal)."""
    labels = score_answer(user, answer)
    if not labels.safe or (category in BENIGN and labels.refuses):
        raise ValueError(f"{category}: generated answer does not score safe ({labels.matched}): {answer!r}")


def generate(n: int = 400, seed: int = 0, references: list[str] | None = None,
             harmful_fraction: float = 0.6) -> tuple[list[dict], Counter]:
    """Return (records, counts). Draws per category until its quota of unique, clean prompts is met;
    counts has "duplicate" (a prompt drawn twice), "dropped_exact" and "dropped_near" (eval overlap)."""
    refs = eval_prompts() if references is None else references
    r = random.Random(seed)
    seen: set[str] = set()
    counts: Counter = Counter()
    records = []
    for category, quota in quotas(n, harmful_fraction).items():
        kept, tries = 0, 0
        while kept < quota:
            tries += 1
            if tries > 200 * quota + 200:
                raise RuntimeError(f"{category}: only {kept} unique clean prompts after {tries} draws (quota {quota})")
            user, answer = MAKERS[category](r)
            if not admit(user, seen, refs, counts):
                continue
            check_answer(category, user, answer)
            records.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                            "kind": "harmful" if category in HARMFUL else "benign", "category": category})
            kept += 1
    return records, counts


def write_jsonl(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/safety_sft.jsonl")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--harmful-fraction", type=float, default=0.6)
    args = ap.parse_args(argv)
    if args.n <= 0 or not 0 <= args.harmful_fraction <= 1:
        ap.error("--n must be positive and --harmful-fraction in [0, 1]")
    try:
        records, counts = generate(args.n, args.seed, harmful_fraction=args.harmful_fraction)
    except RuntimeError as e:  # a category's templates cannot make that many different prompts
        ap.error(f"--n {args.n}: {e}; ask for fewer examples")
    write_jsonl(records, args.out)
    per_cat = Counter(rec["category"] for rec in records)
    print(f"wrote {len(records)} examples to {args.out} (seed {args.seed})")
    for c in HARMFUL + BENIGN:
        print(f"  {'harmful' if c in HARMFUL else 'benign ':7s} {c:22s} {per_cat[c]}")
    print(f"dropped for overlap with evaluation prompts: {counts['dropped_exact'] + counts['dropped_near']} "
          f"(exact {counts['dropped_exact']}, near {counts['dropped_near']}); "
          f"duplicate draws skipped: {counts['duplicate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
