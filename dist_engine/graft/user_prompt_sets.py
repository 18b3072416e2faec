"""The later template sets of the graft prompts, in the words users type.

Appended after ``prompt_sets.py``'s sets in this order, so earlier prompts keep their place
(and their held-out split); a new set goes at the end.
"""

from __future__ import annotations

from dist_engine.graft.prompt_sets import ANIMALS, EVENTS, MORE_TOPICS

# A fourth set, in the words users type: "why" and "how" questions, definitions, rewriting,
# short code in other languages, everyday advice and messages.
_WHY = [
    "the sky is blue", "leaves change colour in autumn", "we dream", "the sea is salty",
    "ice floats on water", "we have seasons", "cats purr", "bread rises", "we yawn",
    "the sun sets red", "planes can fly", "onions make you cry", "metal feels cold",
    "birds migrate", "we get goosebumps", "stars twinkle", "the Moon has craters",
    "coffee keeps people awake", "hair turns grey", "zebras have stripes", "we need vitamins",
    "the Earth is round", "rust forms on iron", "popcorn pops", "music gives us chills",
    "the Dead Sea is so salty", "our ears pop on planes", "the ocean has waves",
    "some people are left-handed", "fingers wrinkle in water", "lightning comes before thunder",
    "cities are warmer than the countryside", "batteries run down", "dogs wag their tails",
]
_HOW = [
    "a thermometer measures temperature", "a bill becomes a law", "the heart pumps blood", "a plane stays in the air",
    "a seed grows into a plant", "email reaches its recipient", "a fridge keeps food cold",
    "the body fights a cold", "a bank decides on a loan", "a compiler turns code into a program",
    "snow forms", "a website loads in a browser", "muscles grow after exercise",
    "a song gets recorded in a studio", "glass is made", "a river shapes a valley",
    "a password is stored safely", "noise-cancelling headphones work", "a caterpillar becomes a butterfly",
    "a hurricane forms", "paper is recycled", "an election is counted", "a vaccine is tested",
    "a map app finds the fastest route", "cheese is made", "the eye sees colour",
    "a tree knows when to lose its leaves", "a satellite stays in orbit", "yeast makes bread rise",
    "a film gets made", "a country's currency gets its value", "the kidneys clean blood",
]
_TERMS = [
    "opportunity cost", "entropy", "a mortgage", "photosynthesis", "a metaphor", "an ecosystem",
    "compound interest", "a hypothesis", "inflation", "an algorithm", "biodiversity", "a sonnet",
    "the placebo effect", "a recession", "a neuron", "an index fund", "irony", "a catalyst",
    "a carbon footprint", "a microservice", "a contract", "an allergy", "a budget deficit",
    "cognitive bias", "a genome", "the greenhouse effect", "a startup", "a firewall",
    "a haiku", "a protein", "a tariff", "a supernova",
]
_CODE_TASKS = [
    "selects the ten most recent orders from an orders table",
    "counts the customers in each country", "finds duplicate email addresses in a users table",
    "joins an employees table with a departments table", "computes the average salary per department",
    "deletes rows older than thirty days", "finds the products that were never ordered",
    "returns the top three scores for each player",
]
_SHELL_TASKS = [
    "finds all files larger than 100 MB", "counts the lines in every Python file in a folder",
    "renames all .txt files to .md", "shows the ten biggest folders", "finds which process uses a port",
    "compresses a folder into a tar.gz archive", "searches for a word in all files recursively",
    "prints the last 50 lines of a log file and follows it",
]
_LANG_TASKS = [
    "reverses a string", "checks whether a number is even", "sums a list of numbers",
    "finds the largest of three numbers", "prints the multiplication table of 7",
    "counts the words in a sentence", "converts a string to upper case", "swaps two variables",
]
_LANGS = ["Java", "C", "Go", "Rust", "C++", "Ruby"]
_SENTENCES = [
    "The meeting was moved to Thursday because the manager was sick.",
    "I am writing to complain about the late delivery of my order.",
    "Our team finished the project two weeks ahead of schedule.",
    "The weather was terrible, so we stayed inside and played games.",
    "Please remember to bring your own lunch to the workshop.",
    "The new library opens next month with a big celebration.",
    "He forgot his umbrella and got completely soaked on the way home.",
    "Sales grew by ten percent in the last quarter thanks to the new product.",
    "The cat knocked the vase off the table and ran away.",
    "We need more volunteers for the summer festival.",
    "The train was delayed for an hour because of a signal failure.",
    "She practised the piano every day and won the competition.",
]
_PEOPLE = [
    "Marie Curie", "Leonardo da Vinci", "Isaac Newton", "Ada Lovelace", "Nelson Mandela",
    "Albert Einstein", "Cleopatra", "Charles Darwin", "Mahatma Gandhi", "William Shakespeare",
    "Galileo Galilei", "Florence Nightingale", "Alan Turing", "Frida Kahlo", "Napoleon Bonaparte",
    "Rosa Parks", "Nikola Tesla", "Jane Austen", "Confucius", "Amelia Earhart",
]
_SITUATIONS = [
    "my friend forgot my birthday", "I missed an important deadline at work",
    "my neighbour plays loud music at night", "I can't decide what to study at university",
    "I feel nervous before exams", "my houseplants keep dying", "I want to ask for a raise",
    "my child doesn't want to read", "I have too many meetings", "I argued with my sister",
    "I can't fall asleep at night", "I want to change careers at forty",
    "my laptop is running slowly", "I spend too much money on takeaway food",
    "I moved to a new city and feel lonely", "my team disagrees about a project plan",
]
_MESSAGES = [
    "thank a colleague for their help", "ask my landlord to fix the heating",
    "apologise to a customer for a delay", "decline a meeting invitation politely",
    "ask my teacher for an extension", "congratulate a friend on a new job",
    "remind a client about an unpaid invoice", "welcome a new team member",
    "request a day off from my manager", "cancel a gym membership",
    "ask for feedback after a job interview", "invite my neighbours to a barbecue",
]
_PRODUCTS = [
    "a reusable water bottle", "a pair of running shoes", "a smart watch", "a wooden chess set",
    "a noise-cancelling headset", "an electric kettle", "a hiking backpack", "a desk lamp",
    "a language-learning app", "a board game for families", "a coffee grinder", "a yoga mat",
]
_NUMBERS = [
    ("12", "15"), ("7", "8"), ("144", "12"), ("250", "4"), ("36", "48"), ("1000", "7"),
    ("18", "24"), ("90", "5"), ("65", "13"), ("300", "15"), ("81", "9"), ("56", "14"),
]

USER_TEMPLATES: list[tuple[str, list]] = [
    ("Explain why {}.", _WHY),
    ("Can you explain why {}?", _WHY),
    ("Explain how {}.", _HOW),
    ("Describe step by step how {}.", _HOW),
    ("What is {}? Explain with an example.", _TERMS),
    ("Define {} in one or two sentences, then give an everyday example.", _TERMS),
    ("Write an SQL query that {}.", _CODE_TASKS),
    ("Write a shell command that {}, and explain it.", _SHELL_TASKS),
    ("Write a {1} program that {0}.", [(t, lang) for t in _LANG_TASKS for lang in _LANGS[:3]]),
    ("Show how to write a function in {1} that {0}.", [(t, lang) for t in _LANG_TASKS for lang in _LANGS[3:]]),
    ("Rewrite this sentence in a more formal style: {}", _SENTENCES),
    ("Summarise this sentence in five words or fewer: {}", _SENTENCES),
    ("Who was {} and why are they remembered?", _PEOPLE),
    ("Write a short biography of {}.", _PEOPLE),
    ("What advice would you give if {}?", _SITUATIONS),
    ("Write a short email to {}.", _MESSAGES),
    ("Write a product description for {}.", _PRODUCTS),
    ("What is {} times {}? Show your working.", _NUMBERS),
    ("What is {} divided by {}? Explain the steps.", _NUMBERS),
    ("List five questions a curious child might ask about {}.", ANIMALS),
    ("What are the main causes and effects of {}?", MORE_TOPICS),
    ("Write a short news report about {}.", EVENTS),
]
