"""The fifth template set of the graft prompts, appended after ``user_prompt_sets.py``'s."""

from __future__ import annotations

# A fifth set, casual and first-person: quick facts, troubleshooting, myths, what-ifs, cooking
# from what is in the fridge, code to read or fix, word problems, tone rewrites, regexes, JSON.
_QUICK = [
    "how many bones are in the human body?", "what's the tallest mountain in Africa?",
    "how far away is the Sun?", "who painted the Mona Lisa?", "what language do they speak in Brazil?",
    "why is Pluto not a planet any more?", "what's the boiling point of water on top of Everest?",
    "how many time zones does Russia have?", "what is the largest desert in the world?",
    "who invented the telephone?", "how old is the universe?", "what does DNA stand for?",
    "how fast does sound travel?", "what's the longest river in Europe?",
]
_ME = [
    "starting my first job next week", "learning to drive", "moving abroad for a year",
    "taking up swimming at forty", "trying to eat less sugar", "about to become a parent",
    "starting a small online shop", "learning to play the guitar", "going on my first solo trip",
    "preparing for a job interview at a bank", "retiring next year", "adopting a rescue dog",
    "learning to cook for myself", "working from home for the first time",
]
_PLANS = [
    "shopping list for a week of healthy dinners", "study timetable for the month before exams",
    "morning routine that takes thirty minutes", "budget for a student living on 800 euros a month",
    "checklist for moving house", "reading list of classic novels for a teenager",
    "plan for cleaning the whole house in one weekend", "list of icebreaker questions for a team meeting",
    "ten-minute stretching routine for office workers", "birthday party plan for a seven-year-old",
    "to-do list for launching a podcast", "list of things to do before a long flight",
]
_PROBLEMS = [
    "phone battery drains very fast", "wifi keeps disconnecting", "bread comes out dense and flat",
    "bike chain keeps slipping", "car squeaks when I brake", "tomato plants have yellow leaves",
    "printer says it is offline", "shower has very low water pressure",
    "Python code throws 'list index out of range'", "cake sinks in the middle",
    "laptop fan is always loud", "script fails with 'ModuleNotFoundError'",
]
_ELI5 = [
    "how the internet works", "what money is", "why we need sleep", "what electricity is",
    "how a phone call travels", "what a computer program is", "why the Moon changes shape",
    "what taxes are for", "how a plane turns in the air", "what germs are", "why it rains",
    "what a star is",
]
_WHAT_IF = [
    "you never cut your hair", "the Moon disappeared", "you swallow chewing gum",
    "everyone on Earth jumped at once", "you put metal in a microwave",
    "a country prints too much money", "bees went extinct", "you don't drink water for a day",
    "the internet went down for a week", "you leave milk out of the fridge overnight",
    "two black holes collide", "you stop using a muscle",
]
_CLAIMS = [
    "we only use ten percent of our brains", "goldfish have a three-second memory",
    "lightning never strikes the same place twice", "cracking your knuckles causes arthritis",
    "the Great Wall of China is visible from space", "bats are blind",
    "sugar makes children hyperactive", "you lose most of your body heat through your head",
    "bulls hate the colour red", "humans have only five senses", "carrots improve your eyesight",
    "you should wait an hour after eating before swimming",
]
_FRIDGE = [
    "eggs, spinach and some cheese", "rice, a can of beans and an onion",
    "pasta, garlic and a tin of tomatoes", "chicken thighs, potatoes and carrots",
    "tofu, broccoli and soy sauce", "flour, milk and a few apples", "leftover rice and frozen peas",
    "lentils, coconut milk and curry powder", "bread, tomatoes and mozzarella",
    "salmon, a lemon and some green beans",
]
_IDEAS = [
    "a school science fair project", "a team-building day", "a rainy Sunday with kids",
    "a small business I can run from home", "a mobile app that helps students",
    "a short film on a tiny budget", "a fundraising event for a library",
    "a gift for someone who has everything", "a cooking blog", "using less plastic at the office",
]
_ANNOUNCEMENTS = [
    "our bakery's new sourdough", "a free coding workshop on Saturday", "the launch of our recycling app",
    "a charity run next month", "our shop's summer sale", "a new episode of our podcast",
    "the opening of a community garden", "a job opening for a graphic designer",
    "our team winning a hackathon", "new opening hours at the library",
]
_PAIRS = [
    ("a crocodile", "an alligator"), ("baking soda", "baking powder"), ("a simile", "a metaphor"),
    ("RAM", "storage"), ("affect", "effect"), ("a comet", "an asteroid"), ("speed", "velocity"),
    ("a latte", "a cappuccino"), ("HTTP", "HTTPS"), ("saving", "investing"), ("a lake", "a pond"),
    ("Git", "GitHub"), ("a tortoise", "a turtle"), ("weather", "climate"),
]
_SNIPPETS = [
    "sum(x for x in range(10) if x % 2 == 0)", "[w[::-1] for w in text.split()]",
    "sorted(d.items(), key=lambda kv: kv[1], reverse=True)[:3]", "set(a) & set(b)",
    "{k: v for k, v in zip(keys, values)}", "' '.join(w.capitalize() for w in s.split())",
    "any(c.isdigit() for c in password)", "max(scores, key=scores.get)",
    "[line for line in open('log.txt') if 'ERROR' in line]", "list(range(10, 0, -2))",
]
_BUGS = [
    "for i in range(len(items)): print(items[i + 1])", "def is_even(n): return n % 2 == 1",
    "def fact(n): return n * fact(n - 1)", "if name = 'admin': print('hello')",
    "items = [1, 2, 3]; items.append[4]", "count = '5' + 3",
    "def average(xs): return sum(xs) / len(xs) + 1", "while i < 10: print(i)",
]
_PEP_TALKS = [
    "I failed my driving test", "I have a big presentation tomorrow", "I'm behind on my thesis",
    "my startup idea got rejected", "I'm starting a new diet on Monday",
    "it's my first day at a new school", "I didn't get the job I wanted",
    "I'm running my first half marathon on Sunday",
]
_JARGON = [
    "We need to leverage our synergies to move the needle this quarter.",
    "The patient presented with acute bilateral otitis media.",
    "The defendant's motion to dismiss was denied without prejudice.",
    "Our API is rate-limited to prevent abuse of shared resources.",
    "The fund rebalances quarterly to maintain its target asset allocation.",
    "The function has quadratic time complexity in the worst case.",
    "The study found a statistically significant correlation, but not causation.",
    "Please circle back once you have bandwidth to action these deliverables.",
]
_JOKES = ["programmers", "cats", "mathematicians", "coffee", "Mondays", "dinosaurs", "teachers",
          "the weather", "vegetables", "robots"]
_TOASTS = [
    "my sister's wedding", "a colleague who is retiring", "my parents' 30th anniversary",
    "a friend's graduation", "the end of a successful project", "a best friend moving abroad",
    "New Year's Eve with my family", "my grandfather's 80th birthday",
]
_ESTIMATES = [
    "piano tuners work in a big city", "tennis balls fit in a school bus",
    "words are in a typical novel", "times does a heart beat in a lifetime",
    "litres of water does a family use in a week", "steps does someone walk in a year",
    "slices of pizza are eaten in a city each day", "books fit in a small library",
]
_ORDERINGS = [
    "an atom, a cell, a grain of sand, a virus", "the Earth, the Sun, the Moon, Jupiter",
    "a byte, a kilobyte, a gigabyte, a megabyte", "a millimetre, an inch, a centimetre, a foot",
    "a mouse, an elephant, a horse, a dog", "a minute, a fortnight, an hour, a day",
    "a lake, an ocean, a puddle, a sea", "a village, a city, a town, a country",
]
_WORD_PROBLEMS = [
    "A train leaves at 2 pm and travels 180 km at 60 km per hour. When does it arrive?",
    "Anna has three times as many apples as Ben. Together they have 24. How many does each have?",
    "A shirt costs 40 euros and is 25 percent off. What is the sale price?",
    "A recipe for 4 people needs 300 g of flour. How much is needed for 10 people?",
    "A rectangle is 8 m long and 5 m wide. What are its area and perimeter?",
    "If you save 15 dollars a week, how long until you have 600 dollars?",
    "A car uses 6 litres of fuel per 100 km. How much fuel does a 350 km trip need?",
    "Three friends split a 72 dollar bill, and one of them pays double. How much does each pay?",
]
_DEBATES = [
    "working from home", "electric scooters in cities", "homeschooling", "a four-day work week",
    "social media for teenagers", "buying a used car", "living alone",
    "learning two languages at once", "nuclear power", "self-checkout machines",
]
_STORY_SEEDS = [
    "a forgotten umbrella", "a robot learning to paint", "the first day of spring",
    "a key that opens every door", "a lost balloon", "a wizard's apprentice",
    "a message in a bottle", "a haunted library",
]
_ROLES = [
    "a pirate captain", "a medieval blacksmith", "a tour guide in Rome", "a tired barista",
    "a Mars rover", "a museum security guard", "a knight's horse", "a weather forecaster",
]
_LISTS = [
    "ten easy houseplants", "good names for a black cat", "fun things to do in winter",
    "questions to ask on a first date", "healthy snacks for work", "classic films everyone should see",
    "board games for two players", "ways to say thank you in different languages",
]
_BLUNT = [
    "Send me the report now.", "Your application was rejected.", "Stop parking in my space.",
    "The meeting is cancelled. Don't come.", "You made a mistake in the invoice.",
    "We don't offer refunds.", "Reply to my email.", "The office is closed tomorrow.",
]
_PATTERNS = [
    "a UK postcode", "a date in the format YYYY-MM-DD", "a hexadecimal colour code",
    "an IPv4 address", "a US phone number", "a word that starts with a capital letter",
    "a time in 24-hour format", "a simple email address",
]
_RECORDS = ["a book", "a film", "a user account", "a restaurant", "a weather forecast",
            "a flight booking", "a recipe", "a music album"]
_VIRTUES = ["patience", "failure", "teamwork", "curiosity", "kindness", "hard work", "change", "courage"]

CASUAL_TEMPLATES: list[tuple[str, list]] = [
    ("hey, quick question: {}", _QUICK),
    ("I'm {}. Any advice?", _ME),
    ("Can you make me a {}?", _PLANS),
    ("My {}. What could be wrong and how do I fix it?", _PROBLEMS),
    ("Explain {} like I'm five.", _ELI5),
    ("What happens if {}?", _WHAT_IF),
    ("Is it true that {}?", _CLAIMS),
    ("I have {}. What can I make for dinner?", _FRIDGE),
    ("Brainstorm ten ideas for {}.", _IDEAS),
    ("Write a tweet announcing {}.", _ANNOUNCEMENTS),
    ("What's the difference between {} and {}?", _PAIRS),
    ("What does this Python code do? {}", _SNIPPETS),
    ("Find the bug in this code and fix it: {}", _BUGS),
    ("Give me a short pep talk, {}.", _PEP_TALKS),
    ("Translate into plain English: {}", _JARGON),
    ("Tell me a joke about {}, then explain why it's funny.", _JOKES),
    ("Write a toast for {}.", _TOASTS),
    ("Roughly how many {}? Explain how you estimated it.", _ESTIMATES),
    ("Sort these from smallest to largest and explain: {}.", _ORDERINGS),
    ("{} Solve it step by step.", _WORD_PROBLEMS),
    ("Give me three pros and three cons of {}.", _DEBATES),
    ("Write a story in exactly three sentences about {}.", _STORY_SEEDS),
    ("Pretend you are {}. Introduce yourself and describe your day.", _ROLES),
    ("Give me a list of {}.", _LISTS),
    ("Rewrite this to sound friendlier: {}", _BLUNT),
    ("Write a regular expression that matches {} and explain each part.", _PATTERNS),
    ("Return a JSON object describing {}, with a few sensible fields.", _RECORDS),
    ("Write a short motivational quote about {} and explain what it means.", _VIRTUES),
]
