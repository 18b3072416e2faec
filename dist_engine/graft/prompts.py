"""A varied prompt set for self-distillation, built from templates so it lives in the repository.

The base model answers these prompts with its own generations (greedy and sampled); those
answers are the training data of a grafted MTP layer. Each template is crossed with a list of
subjects; the order is fixed, so the held-out split is the same on every machine, and new sets
are appended so earlier prompts keep their place.
"""

from __future__ import annotations

import itertools

_TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "vaccines",
    "climate change", "the stock market", "plate tectonics", "the immune system", "blockchains",
    "the water cycle", "quantum computing", "inflation", "the Roman Empire", "DNA replication",
    "electric cars", "the internet", "volcanoes", "meditation", "supply and demand",
    "renewable energy", "the human heart", "compilers", "jazz music", "honey bees",
    "operating systems", "the Moon landing", "sleep", "coral reefs", "public key cryptography",
    "the printing press", "antibiotics", "rainbows", "databases", "the Silk Road", "gravity",
]
_TASKS = [
    "checks whether a number is prime", "reverses a linked list", "counts words in a text file",
    "merges two sorted lists", "computes the nth Fibonacci number", "validates an email address",
    "finds duplicates in a list", "converts Celsius to Fahrenheit", "flattens a nested list",
    "parses a CSV line", "computes a moving average", "checks for balanced parentheses",
    "implements binary search", "removes vowels from a string", "sorts a dictionary by value",
    "computes the greatest common divisor", "generates all permutations of a string",
    "reads a JSON file and prints its keys", "finds the longest word in a sentence",
    "implements a stack class", "counts the frequency of characters", "checks if a string is a palindrome",
    "transposes a matrix", "implements bubble sort",
]
_THINGS = [
    "a lighthouse keeper", "a lost robot", "a dragon who cannot fly", "a city under the sea",
    "a time traveller", "a talking cat", "the last tree on Earth", "a chef on Mars",
    "a detective in Paris", "an old violin", "a snowman in summer", "a friendly ghost",
    "a child who finds a map", "a spaceship crew", "a village baker", "a clockmaker",
]
_CHOICES = [
    ("cats", "dogs"), ("city life", "country life"), ("Python", "JavaScript"),
    ("working from home", "working in an office"), ("reading books", "watching films"),
    ("trains", "planes"), ("summer", "winter"), ("SQL", "NoSQL databases"),
    ("renting", "buying a home"), ("tea", "coffee"), ("public schools", "homeschooling"),
    ("solar power", "wind power"),
]
_SKILLS = [
    "learn a new language", "prepare for a job interview", "start running", "save money",
    "write a good essay", "improve my sleep", "learn to cook", "manage stress", "study for exams",
    "start a vegetable garden", "learn the guitar", "give a good presentation",
    "make new friends in a new city", "organise my week", "learn to draw", "train a puppy",
]

_TEMPLATES: list[tuple[str, list]] = [
    ("Explain {} to a ten-year-old.", _TOPICS),
    ("Write a short paragraph about {}.", _TOPICS),
    ("What are three interesting facts about {}?", _TOPICS),
    ("Summarise the history of {} in a few sentences.", _TOPICS),
    ("Write a Python function that {}.", _TASKS),
    ("How would you write code that {}? Explain briefly.", _TASKS),
    ("Write a short story about {}.", _THINGS),
    ("Write a poem about {}.", _THINGS),
    ("Compare {} and {}.", _CHOICES),
    ("What are the pros and cons of {} versus {}?", _CHOICES),
    ("How can I {}?", _SKILLS),
    ("Give me five tips to {}.", _SKILLS),
]

# Two more sets, appended after the first so the first 280 prompts (and their held-out split)
# stay where they were: more varied self-generated answers are what a graft learns from.
_MORE_TOPICS = [
    "earthquakes", "the Renaissance", "neural networks", "the solar system", "tsunamis",
    "the Industrial Revolution", "bacteria", "the Great Wall of China", "electricity", "magnets",
    "the ancient Egyptians", "recycling", "cloud computing", "the ozone layer", "hurricanes",
    "the human brain", "photography", "the Olympic Games", "glaciers", "interest rates",
    "the theory of evolution", "airplanes", "the periodic table", "rainforests", "nuclear power",
    "the Cold War", "smartphones", "the human skeleton", "deserts", "the Pythagorean theorem",
    "microplastics", "the Amazon river", "social media", "tides", "the Vikings", "batteries",
    "caffeine", "the moon's phases", "open source software", "bridges", "the stomach",
    "penguins", "the metric system", "wind turbines", "chess", "the Byzantine Empire",
    "3D printing", "the speed of light", "mushrooms", "democracy", "GPS", "the Sahara",
]
_DEVICES = [
    "a refrigerator", "a microwave oven", "a bicycle gear", "a solar panel", "a jet engine",
    "a thermostat", "a touchscreen", "a camera lens", "a hard drive", "a vaccine", "a compass",
    "an elevator", "a search engine", "a credit card", "a heat pump", "a submarine",
    "a web browser", "a hearing aid", "an electric motor", "a barcode scanner",
]
_MORE_TASKS = [
    "finds the maximum value in a list", "checks whether two strings are anagrams",
    "computes the factorial of a number", "removes duplicates from a list while keeping order",
    "converts a Roman numeral to an integer", "counts the vowels in a string",
    "implements a queue using two stacks", "computes the sum of the digits of a number",
    "finds the second largest number in a list", "capitalises the first letter of every word",
    "implements insertion sort", "checks whether a year is a leap year",
    "converts a decimal number to binary", "finds the intersection of two lists",
    "rotates a list by k positions", "computes the median of a list",
    "implements a simple calculator", "splits a list into chunks of size n",
    "finds all prime numbers below n", "checks whether a list is sorted",
    "computes the power set of a set", "implements a binary tree insert",
    "counts lines in a file that contain a word", "generates a random password",
    "merges two dictionaries", "finds the most common element in a list",
]
_CHARACTERS = [
    "a brave mouse", "a robot learning to paint", "a pirate who fears water", "an astronaut",
    "a girl who can talk to birds", "a forgotten toy", "a wizard's apprentice", "a lonely whale",
    "a king who lost his crown", "a small boat in a storm", "a grandmother's garden",
    "a fox and a crow", "a train that never stops", "a painter who lost her colours",
    "a mountain climber", "a library at night", "a baby dragon", "a shy giant",
    "a musician in the rain", "a stray dog in the city", "an inventor's workshop",
    "a firefly", "a tiny island", "the first day of school",
]
_MORE_CHOICES = [
    ("electric cars", "petrol cars"), ("email", "instant messaging"), ("running", "swimming"),
    ("paper books", "e-books"), ("mountains", "beaches"), ("Linux", "Windows"),
    ("cooking at home", "eating out"), ("laptops", "desktop computers"), ("Java", "C++"),
    ("studying alone", "studying in a group"), ("nuclear power", "coal power"),
    ("cycling", "driving to work"), ("classical music", "pop music"), ("REST", "GraphQL"),
    ("museums", "zoos"), ("freelancing", "full-time employment"), ("tablets", "notebooks"),
    ("the violin", "the piano"),
]
_MORE_SKILLS = [
    "become more productive", "learn to swim", "write a cover letter", "stop procrastinating",
    "learn programming", "improve my memory", "plan a trip abroad", "eat more healthily",
    "speak in public with confidence", "keep a journal", "learn chess", "reduce screen time",
    "decorate a small room", "take better photos", "negotiate a salary", "start a podcast",
    "care for houseplants", "learn touch typing", "prepare for a marathon", "bake bread",
    "be a better listener", "budget for a holiday", "learn to meditate", "write a novel",
]
_DISHES = [
    "pancakes", "tomato soup", "a vegetable curry", "banana bread", "a Greek salad",
    "fried rice", "lemonade", "chocolate chip cookies", "guacamole", "a mushroom risotto",
    "a fruit smoothie", "spaghetti bolognese", "hummus", "an omelette", "apple pie", "falafel",
]
_JOBS = [
    "a nurse", "a software engineer", "a farmer", "a firefighter", "a teacher", "an architect",
    "a pilot", "a librarian", "a marine biologist", "a chef", "a journalist", "a carpenter",
    "a park ranger", "a pharmacist", "an electrician", "a translator",
]

_MORE_TEMPLATES: list[tuple[str, list]] = [
    ("Explain {} in simple terms.", _MORE_TOPICS),
    ("What is the importance of {}?", _MORE_TOPICS),
    ("Write a short blog post introduction about {}.", _MORE_TOPICS),
    ("What are common misconceptions about {}?", _MORE_TOPICS),
    ("Describe how {} works.", _DEVICES),
    ("What would happen if {} stopped working? Explain.", _DEVICES),
    ("Write a Python function that {}.", _MORE_TASKS),
    ("Write a JavaScript function that {}, with a short comment.", _MORE_TASKS),
    ("Write a short story about {}.", _CHARACTERS),
    ("Write a haiku and a limerick about {}.", _CHARACTERS),
    ("Which is better, {} or {}? Give reasons.", _MORE_CHOICES),
    ("Write a short debate between someone who prefers {} and someone who prefers {}.",
     _MORE_CHOICES),
    ("What steps should I take to {}?", _MORE_SKILLS),
    ("I want to {}. What mistakes should I avoid?", _MORE_SKILLS),
    ("Give me a simple recipe for {}.", _DISHES),
    ("Describe a typical day in the life of {}.", _JOBS),
    ("Write a job advertisement for {}.", _JOBS),
]

_CONCEPTS = [
    "a variable", "a function", "recursion", "a hash map", "an API", "a class", "a loop",
    "a pointer", "a unit test", "version control", "a race condition", "a linked list",
    "garbage collection", "an exception", "a compiler error", "a regular expression",
    "a database index", "a virtual machine", "caching", "an algorithm's time complexity",
]
_PLACES = [
    "Japan", "the Alps", "New York City", "the Grand Canyon", "Iceland", "Kenya", "Venice",
    "the Great Barrier Reef", "Peru", "Norway", "Morocco", "Australia", "Scotland", "Vietnam",
    "Canada's Rocky Mountains", "Egypt", "Istanbul", "New Zealand",
]
_ANIMALS = [
    "elephants", "octopuses", "wolves", "owls", "dolphins", "ants", "tigers", "bats",
    "sea turtles", "crows", "giraffes", "sharks", "butterflies", "horses", "frogs", "polar bears",
]
_EVENTS = [
    "a birthday party", "a school science fair", "a family camping trip", "a team meeting",
    "a wedding toast", "a charity bake sale", "a neighbourhood clean-up", "a book club evening",
    "a first job interview", "a farewell party for a colleague", "a picnic in the park",
    "a small business launch",
]

_EXTRA_TEMPLATES: list[tuple[str, list]] = [
    ("What is {} in programming? Give an example.", _CONCEPTS),
    ("Explain {} to a beginner programmer.", _CONCEPTS),
    ("Plan a three-day trip to {}.", _PLACES),
    ("What should a first-time visitor know about {}?", _PLACES),
    ("Tell me some surprising facts about {}.", _ANIMALS),
    ("How do {} survive in the wild?", _ANIMALS),
    ("Write a children's story about {}.", _ANIMALS),
    ("Help me plan {}.", _EVENTS),
    ("Write a short speech for {}.", _EVENTS),
    ("Write a friendly email inviting people to {}.", _EVENTS),
    ("What questions would a student ask about {}? Answer two of them.", _MORE_TOPICS),
    ("Write a dialogue between a teacher and a student about {}.", _TOPICS),
]


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

_USER_TEMPLATES: list[tuple[str, list]] = [
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
    ("List five questions a curious child might ask about {}.", _ANIMALS),
    ("What are the main causes and effects of {}?", _MORE_TOPICS),
    ("Write a short news report about {}.", _EVENTS),
]

def _interleave(templates: list[tuple[str, list]]) -> list[str]:
    per_template = [[template.format(*s) if isinstance(s, tuple) else template.format(s)
                     for s in subjects] for template, subjects in templates]
    out = []
    for row in itertools.zip_longest(*per_template):
        out.extend(p for p in row if p is not None)
    return out


def graft_prompts() -> list[str]:
    """All prompts, interleaved across templates so any prefix of each set is varied."""
    return (_interleave(_TEMPLATES) + _interleave(_MORE_TEMPLATES)
            + _interleave(_EXTRA_TEMPLATES) + _interleave(_USER_TEMPLATES))


def split_prompts(held_out_every: int = 10) -> tuple[list[str], list[str]]:
    """(train, held-out): every ``held_out_every``-th prompt is held out."""
    prompts = graft_prompts()
    held = [p for i, p in enumerate(prompts) if i % held_out_every == held_out_every - 1]
    train = [p for i, p in enumerate(prompts) if i % held_out_every != held_out_every - 1]
    return train, held
