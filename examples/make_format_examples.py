"""Writes the small example datasets that show the other upload formats (the alpaca one is
json_answers.jsonl, written by make_json_answers.py):

    chat_messages.jsonl    messages (OpenAI role/content): a kitchen unit converter, some
                           conversations with a follow-up question (multi-turn)
    sharegpt_support.json  ShareGPT (conversations with from/value, one JSON array): git help
    science_qa.csv         a spreadsheet with question,answer columns: train it with
                           --columns instruction=question,output=answer

    python examples/make_format_examples.py   # rewrites the three files
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

KITCHEN_SYSTEM = "You convert cooking measurements. Give the number and unit first, in one short sentence."
KITCHEN = [
    ("How many millilitres are in 1 cup?", "1 US cup is about 237 ml.",
     "And in tablespoons?", "1 cup is 16 tablespoons."),
    ("Convert 350°F to Celsius.", "350°F is about 177°C; most recipes round it to 180°C.", None, None),
    ("How many grams is 1 pound?", "1 pound is about 454 g.", "And half a pound?", "Half a pound is about 227 g."),
    ("How many teaspoons are in a tablespoon?", "1 tablespoon is 3 teaspoons.", None, None),
    ("How many grams is one stick of butter?", "One US stick of butter is 113 g, or half a cup.", None, None),
    ("Convert 200°C to Fahrenheit.", "200°C is 392°F; recipes often say 400°F.", None, None),
    ("How many ml is 1 teaspoon?", "1 teaspoon is about 5 ml.", "And a tablespoon?", "1 tablespoon is about 15 ml."),
    ("How many ounces are in a pound?", "A pound is 16 ounces.", None, None),
    ("How many grams is 1 ounce?", "1 ounce is about 28 g.", None, None),
    ("Convert 425°F to Celsius.", "425°F is about 218°C; set the oven to 220°C.", None, None),
    ("How many cups is 500 ml?", "500 ml is about 2.1 US cups.", None, None),
    ("How many tablespoons are in a quarter cup?", "A quarter cup is 4 tablespoons.",
     "And in a third of a cup?", "A third of a cup is 5 tablespoons plus 1 teaspoon."),
    ("Convert 180°C to Fahrenheit.", "180°C is 356°F, usually written as 350°F.", None, None),
    ("How many grams of flour are in 1 cup?", "1 cup of all-purpose flour is about 125 g, spooned and levelled.",
     "And sugar?", "1 cup of granulated sugar is about 200 g."),
    ("How many cups are in a litre?", "1 litre is about 4.2 US cups.", None, None),
    ("Convert 1 kg to pounds.", "1 kg is about 2.2 pounds.", None, None),
    ("How many millilitres are in a fluid ounce?", "1 US fluid ounce is about 30 ml.", None, None),
    ("Convert 160°C to Fahrenheit.", "160°C is 320°F.", None, None),
    ("How many teaspoons are in half a tablespoon?", "Half a tablespoon is 1.5 teaspoons.", None, None),
    ("How many cups is 250 g of butter?", "250 g of butter is about 1.1 cups.", None, None),
    ("What is gas mark 4 in Celsius?", "Gas mark 4 is 180°C.", "And in Fahrenheit?", "Gas mark 4 is 350°F."),
    ("How many grams is 2 cups of sugar?", "2 cups of granulated sugar is about 400 g.", None, None),
    ("Convert 375°F to Celsius.", "375°F is about 190°C.", None, None),
    ("How many pints are in a quart?", "A US quart is 2 pints.", "And cups in a quart?", "A US quart is 4 cups."),
]

GIT_SYSTEM = "You are a concise git assistant. Give the command first."
GIT = [
    ("How do I undo my last commit but keep the changes?",
     "Run `git reset --soft HEAD~1`. The commit is removed and its changes stay staged.",
     "And if I want to throw the changes away too?",
     "Run `git reset --hard HEAD~1`. This deletes the changes for good, so check `git status` first."),
    ("How do I see which files I changed?",
     "`git status` lists modified, staged and untracked files; `git diff` shows the changes themselves.", None, None),
    ("How do I create a new branch and switch to it?", "`git switch -c NAME` (or the older `git checkout -b NAME`).", None, None),
    ("How do I rename the current branch?", "`git branch -m NEW_NAME`.", None, None),
    ("How do I delete a local branch?", "`git branch -d NAME`; use `-D` to force it when the branch is not merged.", None, None),
    ("How do I discard my changes to one file?",
     "`git restore FILE` puts the file back to its last committed state. The changes are lost.", None, None),
    ("How do I unstage a file?", "`git restore --staged FILE`. The changes stay in your working tree.", None, None),
    ("How do I see the history with one line per commit?", "`git log --oneline`.",
     "Only the last five?", "`git log --oneline -5`."),
    ("How do I change the message of my last commit?",
     "`git commit --amend -m \"new message\"`. Only do this before you push.", None, None),
    ("How do I put my changes aside for a moment?",
     "`git stash` saves them and cleans the working tree; `git stash pop` brings them back.",
     "Can I see what is in the stash?",
     "`git stash list` lists the entries; `git stash show -p` shows the latest one as a diff."),
    ("How do I see who changed each line of a file?", "`git blame FILE` shows the commit and author of every line.", None, None),
    ("How do I add a remote?", "`git remote add origin URL`.", None, None),
    ("How do I push a new branch?",
     "`git push -u origin NAME`; `-u` sets the upstream, so a later `git push` needs no arguments.", None, None),
    ("How do I pull without making a merge commit?", "`git pull --rebase`.", None, None),
    ("How do I stop tracking a file but keep it on disk?",
     "Add it to `.gitignore`, then run `git rm --cached FILE` and commit.", None, None),
    ("How do I compare two branches?", "`git diff main..feature` shows what feature changes relative to main.", None, None),
    ("How do I copy one commit from another branch?", "`git cherry-pick COMMIT`.", None, None),
    ("How do I find the commit that introduced a bug?",
     "Run `git bisect start`, then `git bisect bad` and `git bisect good COMMIT`; test each commit git checks out "
     "and mark it good or bad until git names the culprit.", None, None),
    ("How do I tag a release?", "`git tag -a v1.0 -m \"Release 1.0\"`, then `git push origin v1.0`.", None, None),
    ("How do I clone only the latest commit?", "`git clone --depth 1 URL`.", None, None),
]

SCIENCE = [
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical symbol for silver?", "The chemical symbol for silver is Ag."),
    ("What is the chemical symbol for iron?", "The chemical symbol for iron is Fe."),
    ("What is the chemical symbol for sodium?", "The chemical symbol for sodium is Na."),
    ("What is the chemical symbol for potassium?", "The chemical symbol for potassium is K."),
    ("What is the chemical symbol for lead?", "The chemical symbol for lead is Pb."),
    ("What is the chemical symbol for copper?", "The chemical symbol for copper is Cu."),
    ("What is the chemical symbol for tin?", "The chemical symbol for tin is Sn."),
    ("What is the chemical symbol for mercury?", "The chemical symbol for mercury is Hg."),
    ("What is the chemical symbol for tungsten?", "The chemical symbol for tungsten is W."),
    ("What is the chemical symbol for helium?", "The chemical symbol for helium is He."),
    ("What is the chemical symbol for calcium?", "The chemical symbol for calcium is Ca."),
    ("What is the chemical symbol for zinc?", "The chemical symbol for zinc is Zn."),
    ("What is the chemical symbol for chlorine?", "The chemical symbol for chlorine is Cl."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 °C (212 °F) at sea level."),
    ("At what temperature does water freeze?", "Water freezes at 0 °C (32 °F)."),
    ("How many planets are in the Solar System?", "There are eight planets in the Solar System."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("Which planet is the largest?", "Jupiter is the largest planet in the Solar System."),
    ("How fast does light travel in a vacuum?", "Light travels at about 299,792 km per second in a vacuum."),
    ("What gas do plants take in for photosynthesis?", "Plants take in carbon dioxide for photosynthesis."),
    ("What gas do plants give off in photosynthesis?", "Plants give off oxygen in photosynthesis."),
    ("What is the most abundant gas in Earth's atmosphere?", "Nitrogen, at about 78% of the air."),
    ("How many bones are in the adult human body?", "An adult human has 206 bones."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("What is H2O?", "H2O is water: two hydrogen atoms bonded to one oxygen atom."),
    ("What is the atomic number of carbon?", "The atomic number of carbon is 6."),
    ("What is the atomic number of oxygen?", "The atomic number of oxygen is 8."),
]


def conversation(q: str, a: str, q2: str | None, a2: str | None) -> list[tuple[str, str]]:
    turns = [("user", q), ("assistant", a)]
    if q2 and a2:
        turns += [("user", q2), ("assistant", a2)]
    return turns


def main() -> None:
    here = Path(__file__).parent
    with (here / "chat_messages.jsonl").open("w", encoding="utf-8") as fh:
        for i, row in enumerate(KITCHEN):
            # Half the rows carry their own system message; the others get --system-prompt, if any.
            messages = [{"role": "system", "content": KITCHEN_SYSTEM}] if i % 2 == 0 else []
            messages += [{"role": role, "content": text} for role, text in conversation(*row)]
            fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    sharegpt = []
    for row in GIT:
        turns = [{"from": "system", "value": GIT_SYSTEM}]
        turns += [{"from": "human" if role == "user" else "gpt", "value": text} for role, text in conversation(*row)]
        sharegpt.append({"conversations": turns})
    (here / "sharegpt_support.json").write_text(json.dumps(sharegpt, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with (here / "science_qa.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer"])
        writer.writerows(SCIENCE)
    print(f"{len(KITCHEN)} kitchen conversations, {len(GIT)} git conversations, {len(SCIENCE)} science rows")


if __name__ == "__main__":
    main()
