"""The sixth template set of the graft prompts, appended after ``casual_prompt_sets.py``'s."""

from __future__ import annotations

from dist_engine.graft.chat_texts import (
    BAD_GRAMMAR,
    FACT_TEXTS,
    MESSAGES_IN,
    PASSAGES,
    REVIEWS,
    TO_TRANSLATE,
    WORDY,
)

# A sixth set, everyday chat-assistant chores: passages, reviews, translation, writing, code, money, hobbies.
_PHRASES = [
    ("good morning, how are you", "Japanese"), ("excuse me, where are the toilets", "Spanish"),
    ("nice to meet you", "German"), ("sorry, I don't understand", "French"), ("cheers", "Swedish"),
    ("the bill, please", "Italian"), ("see you tomorrow", "Dutch"), ("sorry I'm late", "Portuguese"),
    ("could I have some water", "Greek"), ("thank you very much", "Korean"),
    ("do you speak English", "Turkish"), ("congratulations", "Polish"),
]
_CONVERSIONS = [
    ("72 degrees Fahrenheit", "Celsius"), ("5 miles", "kilometres"), ("180 pounds", "kilograms"),
    ("2.75 hours", "hours and minutes"), ("1.8 metres", "feet and inches"),
    ("60 miles per hour", "metres per second"), ("750 millilitres", "US fluid ounces"),
    ("3 gigabytes", "megabytes"), ("45 square metres", "square feet"),
    ("25 degrees Celsius", "Fahrenheit"), ("a running speed of 10 km/h", "minutes per kilometre"),
    ("2 tablespoons", "millilitres"), ("100,000 seconds", "days, hours and minutes"),
    ("a 12-stone weight", "kilograms"),
]
_EVERYDAY_MATHS = [
    "Our dinner bill is 86 dollars and we want to leave an 18 percent tip. How much is the tip?",
    "I earn 2,400 a month and want to save 15 percent of it. How much is that in a year?",
    "A jacket went from 120 to 90 pounds. What percentage discount is that?",
    "A wall is 4 m wide and 2.5 m high and needs two coats. One litre of paint covers 10 square "
    "metres. How many litres do I need?",
    "A 30 cm pizza costs 10 euros and a 40 cm one costs 16 euros. Which is better value?",
    "If I read 25 pages a day, how long will a 430-page book take me?",
    "My rent went up from 950 to 1,020 a month. By what percentage did it rise?",
    "A recipe for 6 people uses 450 g of rice. How much rice do I need for 4?",
    "I run 5 km in 28 minutes. What is my pace per kilometre and my speed in km/h?",
    "A phone costs 600 dollars up front or 27 dollars a month for 24 months. How much more does "
    "the monthly plan cost?",
    "Five of us are sharing a 240 euro holiday cottage, but one friend only stays half the time. "
    "What should each person pay?",
    "A 2-litre bottle of juice costs 2.80 and a 330 ml can costs 0.75. Which is cheaper per litre?",
    "My flight leaves at 22:15, takes 9 hours 40 minutes, and the destination is 6 hours ahead. "
    "What is the local time when I land?",
    "I borrow 1,000 at 5 percent simple interest per year. How much do I owe after three years?",
]
_TO_NAME = [
    "a coffee shop that also sells second-hand books", "a kingdom in my fantasy novel",
    "a golden retriever puppy", "a podcast about personal finance", "a team of software testers",
    "a weekend hiking club", "a handmade candle business", "a spaceship in a sci-fi story",
    "a newsletter for amateur astronomers", "a vegan food truck", "a cleaning robot",
    "a school robotics team",
]
_SLOGAN_FOR = [
    "a bicycle repair shop", "a city recycling campaign", "a family dentist", "an online tutoring service",
    "a brand of sparkling water", "a local farmers' market", "a blood donation drive",
    "a gym that never closes", "a library summer reading challenge", "an electric car-sharing service",
    "a pet grooming salon", "a campaign to save water at home",
]
_SHOP_ITEMS = [
    "a handmade ceramic mug with a blue glaze", "a solar-powered phone charger",
    "a linen shirt for hot summers", "a set of three kitchen knives", "a waterproof bluetooth speaker",
    "a wooden world-map puzzle for children", "an ergonomic office chair", "a bamboo chopping board",
    "a cast-iron frying pan", "a weighted blanket", "a pack of reusable beeswax food wraps",
    "a mechanical keyboard with quiet switches",
]
_INSTA = [
    "a bakery's new cinnamon rolls", "a yoga studio's first birthday", "my trip to the Scottish Highlands",
    "a bookshop's author signing", "a dog shelter looking for volunteers", "a beginner photography workshop",
    "finishing my first marathon", "a café's new autumn menu", "a plant shop's weekend sale",
    "our band's gig next Friday", "a beach clean-up this Saturday", "a new handmade jewellery collection",
]
_LINKEDIN = [
    "finishing a data science certificate", "starting a new job as a product manager",
    "what I learned from a project that failed", "my team shipping a big release",
    "being promoted to senior engineer", "hiring two junior developers", "speaking at my first conference",
    "ten years at the same company", "going back to university at thirty-five",
    "leaving my job to start a business", "mentoring students as a volunteer",
    "my first year as a team manager",
]
_COVER_LETTERS = [
    "a junior web developer role at a small agency", "a summer internship at an architecture firm",
    "a barista job at a busy café", "a teaching assistant post at a primary school",
    "a nurse moving to a hospital in another city", "a marketing coordinator job at a charity",
    "a data analyst role, coming from a background in accounting", "a warehouse supervisor position",
    "a customer support job at a software company", "a graduate job in renewable energy",
    "a part-time library assistant role", "a lab technician post at a university",
]
_THANK = [
    "my neighbour, who watered my plants while I was away", "a teacher who helped my son with maths",
    "the nurses who looked after my father", "a friend who helped me move house",
    "the person who interviewed me yesterday", "my team after a really hard month",
    "a mentor who wrote me a reference", "my aunt for a birthday present",
    "a stranger who handed in my lost wallet", "the volunteers at our charity event",
    "my football coach at the end of the season", "the guests who came to our wedding",
]
_ESSAYS = [
    "the impact of smartphones on teenagers", "why cities should build more cycle lanes",
    "the causes of the French Revolution", "whether homework should be banned",
    "the role of bees in farming", "how social media changed politics",
    "the legacy of the Roman Empire", "why sleep matters for students", "the ethics of self-driving cars",
    "fast fashion and the environment", "the history of the printing press",
    "whether voting should be compulsory", "the benefits of learning a second language",
    "how video games can be educational",
]
_TALKS = [
    ("online security basics", "office staff"), ("healthy eating", "secondary school students"),
    ("how to start running", "a community centre"), ("the history of our town", "a local history society"),
    ("using version control", "new developers"), ("saving for retirement", "people in their twenties"),
    ("reducing food waste", "a parents' evening"), ("how vaccines work", "a general audience"),
    ("public speaking tips", "first-year university students"), ("caring for houseplants", "a garden club"),
    ("writing a good CV", "job seekers"), ("the winter night sky", "an astronomy club"),
]
_INTERVIEWS = [
    "a front-end developer job", "a retail sales assistant position", "a project manager role",
    "a nursing job on a children's ward", "a graphic design internship", "a call centre job",
    "a secondary school teaching post", "a junior accountant role", "a chef job in a hotel kitchen",
    "a DevOps engineer role", "a receptionist job at a dental clinic", "a UX researcher position",
    "a warehouse operative job", "a place to study medicine at university",
]
_COMMANDS = [
    "git rebase -i HEAD~3", "git stash pop", "git reset --hard origin/main", "git cherry-pick a1b2c3d",
    "git log --oneline --graph --all", "docker run -it --rm -p 8080:80 nginx", "docker compose up -d",
    "docker ps -a", "docker build -t myapp .", "chmod 755 deploy.sh", "du -sh * | sort -h",
    "grep -rn TODO src/", "ps aux | grep python", "tar -xzvf backup.tar.gz",
    "ssh -L 5432:localhost:5432 me@server", "find . -name '*.log' -mtime +7 -delete",
]
_TESTED = [
    "converts Celsius to Fahrenheit", "checks whether a string is a palindrome",
    "splits a full name into first and last name", "returns the nth Fibonacci number",
    "checks that a password has at least eight characters and a digit", "merges two sorted lists",
    "totals a shopping cart and applies a discount code", "parses a date written as DD/MM/YYYY",
    "removes duplicates from a list but keeps the order", "counts the vowels in a string",
    "turns a score out of 100 into a letter grade", "splits a list into chunks of size n",
]
_UNDOCUMENTED = [
    "def area(w, h): return w * h",
    "def clamp(x, lo, hi): return max(lo, min(x, hi))",
    "def slugify(s): return '-'.join(s.lower().split())",
    "def mean(xs): return sum(xs) / len(xs) if xs else 0.0",
    "def is_leap(y): return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)",
    "def chunk(xs, n): return [xs[i:i + n] for i in range(0, len(xs), n)]",
    "def flatten(rows): return [x for row in rows for x in row]",
    "def initials(name): return ''.join(p[0].upper() for p in name.split())",
    "def to_cents(amount): return round(amount * 100)",
    "def first_word(s): return s.split()[0] if s.strip() else ''",
    "def invert(d): return {v: k for k, v in d.items()}",
    "def safe_div(a, b): return a / b if b else None",
]
_PROGRAMS = [
    ("reads a number and says whether it is prime", "Go"),
    ("counts how often each word appears in a text file", "Rust"),
    ("prints a countdown from 10 to 1 and then 'Liftoff!'", "Kotlin"),
    ("converts a temperature from Celsius to Fahrenheit", "C#"),
    ("fetches JSON from a URL and prints one field", "TypeScript"),
    ("reverses the order of the words in a sentence", "Java"),
    ("averages the numbers given on the command line", "C"),
    ("implements a simple stack with push and pop", "Go"),
    ("reads a CSV file and sums one column", "Rust"),
    ("checks whether a year is a leap year", "Kotlin"),
    ("simulates rolling two dice a thousand times", "C#"),
    ("defines a Shape interface with an area method and two shapes", "TypeScript"),
    ("finds the second largest number in an array", "Java"),
    ("copies one file to another byte by byte", "C"),
]
_DSA = [
    "a hash table", "binary search", "a linked list", "a binary search tree", "a heap", "merge sort",
    "quicksort", "breadth-first search", "Dijkstra's algorithm", "a circular queue", "a trie",
    "memoisation", "a bloom filter", "an LRU cache",
]
_TABLES = [
    "the planets of the solar system by size, distance from the Sun and number of moons",
    "Python, Java and Go for backend work", "three popular note-taking apps",
    "common houseplants by light and watering needs", "cats, dogs and rabbits as pets",
    "train, coach and plane for getting from London to Paris",
    "the four seasons by weather and things to do", "common cooking oils by smoke point and flavour",
    "PostgreSQL, MongoDB and Redis", "electric, hybrid and petrol cars",
    "the main programming paradigms", "the inner planets and the gas giants",
    "a current account, a savings account and an ISA", "tents, hammocks and bivvy bags for camping",
]
_HISTORY = [
    "the Battle of Hastings", "the Cuban Missile Crisis", "the fall of the Berlin Wall",
    "the Boston Tea Party", "the Chernobyl disaster", "the Great Fire of London",
    "the barons' revolt that led to Magna Carta", "the Meiji Restoration", "the Partition of India",
    "the Apollo 13 mission", "the Dust Bowl", "the eruption of Vesuvius in 79 AD",
    "the Russian Revolution of 1917", "the Wall Street Crash of 1929",
]
_WHEN = [
    "women first get the vote in New Zealand", "the first email get sent", "the euro come into use",
    "the Titanic sink", "people first tame dogs", "the Ottoman Empire end",
    "the first modern Olympic Games take place", "printing reach England", "the Panama Canal open",
    "the Black Death reach Europe", "someone take the first photograph", "apartheid end in South Africa",
]
_FITNESS = [
    "How many days a week should I work out?", "Should I do cardio or weights first?",
    "How do I warm up properly before a run?", "What should I eat before a morning workout?",
    "How much water should I drink when I exercise?", "How do I do a squat with good form?",
    "Is it normal to be sore the day after training?", "How long should I rest between sets?",
    "What's a simple bodyweight routine I can do at home?", "How do I build up to running 5 km?",
    "Should I stretch before or after exercise?", "How do I stay motivated to keep going?",
    "How can I tell if I'm pushing myself too hard?", "Do I need protein shakes to build muscle?",
]
_HABITS = [
    "sleeping better", "healthier teeth", "less eye strain from screens", "good posture at a desk",
    "lowering everyday stress", "eating more vegetables", "drinking enough water",
    "protecting my skin from the sun", "lifting heavy things without hurting my back",
    "a healthy gut", "staying active in an office job", "catching fewer colds in winter",
]
_MONEY = [
    "an emergency fund", "the 50/30/20 budgeting rule", "how a credit score works",
    "the difference between a debit card and a credit card", "how interest on savings is worked out",
    "what an ETF is", "pound-cost averaging", "the snowball method for paying off debt",
    "how a workplace pension works", "what APR means on a loan", "why diversification matters",
    "how to read a payslip", "what a dividend is", "the risks of buy now, pay later",
]
_GARDEN = [
    "when should I plant tulip bulbs?", "how do I start a compost heap?",
    "why are my basil leaves going black?", "how often should I water tomatoes in summer?",
    "what vegetables grow well in shade?", "how do I get rid of slugs without chemicals?",
    "can I grow strawberries on a balcony?", "when's the best time to prune roses?",
    "how do I fix a patchy lawn?", "which flowers are best for bees?",
    "how deep do I plant seed potatoes?", "is August too late to sow carrots?",
]
_PETS = [
    "a hamster", "a kitten", "a budgie", "a guinea pig", "a goldfish", "a bearded dragon",
    "an older rescue cat", "a border collie puppy", "a house rabbit", "a tortoise",
    "a pet rat", "a betta fish",
]
_MUSIC = [
    "a major scale", "a chord progression", "the circle of fifths", "a minor key", "syncopation",
    "a time signature", "a key signature", "an interval", "a seventh chord", "a cadence",
    "a relative minor", "a pentatonic scale",
]
_SPORTS = [
    ("the offside rule", "football"), ("leg before wicket", "cricket"), ("a tie-break", "tennis"),
    ("a two-point conversion", "American football"), ("the shot clock", "basketball"),
    ("the advantage law", "rugby"), ("a let", "table tennis"), ("icing", "ice hockey"),
    ("travelling", "basketball"), ("a scrum", "rugby union"), ("deuce", "tennis"),
    ("the infield fly rule", "baseball"),
]
_ETIQUETTE = [
    "leave a party early", "remind a friend that they owe me money", "decline a wedding invitation",
    "ask guests to take their shoes off", "split the bill at a group dinner",
    "tell a coworker they're too loud on calls", "say no to extra work from my boss",
    "end a phone call that's going on too long", "ask someone to repeat their name",
    "tip at a restaurant in the US", "greet people at a business meeting in Japan",
    "turn down a second date", "ask the neighbours to keep their dog quiet",
    "correct someone who mispronounces my name",
]
_MORE_IDEAS = [
    ("a birthday present for my dad", "a watch and a cookbook"),
    ("where to take the team for lunch", "pizza and sushi"),
    ("blog posts about remote work", "home office setup and time zones"),
    ("rainy day activities for kids", "baking cookies and building a blanket fort"),
    ("a science project about plants", "growing beans under different coloured lights"),
    ("a weekend trip from Berlin", "Dresden and the Baltic coast"),
    ("a date night at home", "a film marathon and cooking together"),
    ("raising money for our school", "a bake sale and a sponsored walk"),
    ("YouTube videos about cooking on a budget", "five dinners for 20 euros"),
    ("short story plots", "a postman who travels in time"),
    ("bakery names", "Rise and Shine and The Daily Loaf"),
    ("ways to reuse glass jars", "storing spices and making candles"),
]
_STUDY = [
    "the water cycle", "supply and demand", "the causes of the First World War",
    "Newton's three laws of motion", "the structure of an atom", "the parts of a plant cell",
    "the Pythagorean theorem", "plate tectonics", "how the immune system works",
    "adding and subtracting fractions", "the life cycle of a star", "basic probability",
]
_IDIOMS = [
    "break the ice", "spill the beans", "bite the bullet", "under the weather",
    "the ball is in your court", "cost an arm and a leg", "let the cat out of the bag",
    "once in a blue moon", "burn the midnight oil", "barking up the wrong tree",
    "a blessing in disguise", "cut corners",
]
_TO_SORT = [
    "apple, carrot, salmon, tomato, lentils, cheddar, almonds, spinach",
    "whale, shark, penguin, bat, eagle, salamander, frog, dolphin",
    "Python, HTML, SQL, Rust, CSS, Bash, JSON, Java",
    "copper, wood, glass, aluminium, plastic, rubber, silver, paper",
    "rent, groceries, cinema tickets, electricity, gym membership, takeaway coffee, insurance",
    "oak, rose, cactus, fern, tulip, pine, moss, sunflower",
    "guitar, trumpet, violin, drum, flute, cello, piano, saxophone",
    "Mercury, Pluto, Titan, Mars, Europa, Neptune, Ceres, the Moon",
    "hammer, spatula, screwdriver, whisk, wrench, ladle, saw, colander",
    "France, Kenya, Peru, Vietnam, Canada, Egypt, Norway, Chile",
    "running, chess, swimming, poker, cycling, Scrabble, rowing, bridge",
    "bytes, kilometres, grams, litres, seconds, amperes, megabytes, ounces",
]

CHAT_TEMPLATES: list[tuple[str, list]] = [
    ("Summarise this in two sentences: {}", PASSAGES),
    ("Pull out every name, date and place mentioned in this text: {}", FACT_TEXTS),
    ('Is this review positive, negative or mixed? Explain briefly. "{}"', REVIEWS),
    ("fix the grammar: {}", BAD_GRAMMAR),
    ("Translate this into {1}: {0}", TO_TRANSLATE),
    ('how do you say "{}" in {}? and how is it pronounced?', _PHRASES),
    ("Convert {} to {}, showing each step.", _CONVERSIONS),
    ("{} Walk me through the calculation.", _EVERYDAY_MATHS),
    ("Suggest ten names for {}.", _TO_NAME),
    ("Come up with five catchy slogans for {}.", _SLOGAN_FOR),
    ("Write a product description for an online shop, under 80 words: {}.", _SHOP_ITEMS),
    ("Write an Instagram post about {}, with a few hashtags.", _INSTA),
    ("Could you draft a LinkedIn post about {}? Keep it humble, not boastful.", _LINKEDIN),
    ("Please write a cover letter for {}.", _COVER_LETTERS),
    ("Write a short thank-you note to {}.", _THANK),
    ("Create an outline for an essay on {}.", _ESSAYS),
    ("Outline a ten-minute talk on {} for {}.", _TALKS),
    ("I have an interview for {} next week. What might they ask, and how should I answer two of "
     "those questions?", _INTERVIEWS),
    ("what does `{}` do?", _COMMANDS),
    ("Write pytest unit tests for a function that {}.", _TESTED),
    ("Write a good docstring for this function: {}", _UNDOCUMENTED),
    ("In {1}, write a small program that {0}. Keep it short and explain it.", _PROGRAMS),
    ("Explain how {} works, with its time complexity and one real use.", _DSA),
    ("Make a markdown table comparing {}.", _TABLES),
    ("What happened during {}, and why does it still matter?", _HISTORY),
    ("when did {}? give me a bit of background too", _WHEN),
    ("I'm new to exercise. {}", _FITNESS),
    ("What simple daily habits help with {}?", _HABITS),
    ("Explain {} in plain terms. I'm just starting to manage my own money.", _MONEY),
    ("gardening q: {}", _GARDEN),
    ("I've just got {}. What do I need to know to look after it properly?", _PETS),
    ("Music theory question: what is {}? Please give an example.", _MUSIC),
    ("In {1}, how does {0} work?", _SPORTS),
    ("What's the polite way to {}?", _ETIQUETTE),
    ("make it shorter: {}", WORDY),
    ("give me three more ideas for {}. so far I have {}", _MORE_IDEAS),
    ('Help me write a polite reply to this message: "{}"', MESSAGES_IN),
    ("Explain {} in one paragraph, then quiz me with three questions on it.", _STUDY),
    ("What does the idiom '{}' mean, and where does it come from?", _IDIOMS),
    ("Sort these into groups and explain your choices: {}", _TO_SORT),
]
