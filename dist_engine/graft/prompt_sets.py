"""The first three template sets of the graft prompts (subjects crossed with templates).

Their order is fixed: ``graft/prompts.py`` interleaves them into the prompt list whose every
10th prompt is held out, so nothing here may be reordered or edited, only appended to in a
new set (``user_prompt_sets.py``).
"""

from __future__ import annotations

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

TEMPLATES: list[tuple[str, list]] = [
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
MORE_TOPICS = [
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

MORE_TEMPLATES: list[tuple[str, list]] = [
    ("Explain {} in simple terms.", MORE_TOPICS),
    ("What is the importance of {}?", MORE_TOPICS),
    ("Write a short blog post introduction about {}.", MORE_TOPICS),
    ("What are common misconceptions about {}?", MORE_TOPICS),
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
ANIMALS = [
    "elephants", "octopuses", "wolves", "owls", "dolphins", "ants", "tigers", "bats",
    "sea turtles", "crows", "giraffes", "sharks", "butterflies", "horses", "frogs", "polar bears",
]
EVENTS = [
    "a birthday party", "a school science fair", "a family camping trip", "a team meeting",
    "a wedding toast", "a charity bake sale", "a neighbourhood clean-up", "a book club evening",
    "a first job interview", "a farewell party for a colleague", "a picnic in the park",
    "a small business launch",
]

EXTRA_TEMPLATES: list[tuple[str, list]] = [
    ("What is {} in programming? Give an example.", _CONCEPTS),
    ("Explain {} to a beginner programmer.", _CONCEPTS),
    ("Plan a three-day trip to {}.", _PLACES),
    ("What should a first-time visitor know about {}?", _PLACES),
    ("Tell me some surprising facts about {}.", ANIMALS),
    ("How do {} survive in the wild?", ANIMALS),
    ("Write a children's story about {}.", ANIMALS),
    ("Help me plan {}.", EVENTS),
    ("Write a short speech for {}.", EVENTS),
    ("Write a friendly email inviting people to {}.", EVENTS),
    ("What questions would a student ask about {}? Answer two of them.", MORE_TOPICS),
    ("Write a dialogue between a teacher and a student about {}.", _TOPICS),
]
