"""The texts the sixth graft prompt set quotes in its prompts (``chat_prompt_sets.py``): short
passages to summarise or mine for facts, reviews, sentences to correct or translate, wordy
paragraphs to shorten and messages to answer. Written for the set; kept apart from its short
subject lists."""

from __future__ import annotations

PASSAGES = [
    "The town council met on Tuesday to discuss the old railway bridge. Engineers reported that "
    "it is safe for people on foot but not for cars, and repairs would cost about two million "
    "euros. The council will vote on the money next month.",
    "Octopuses have three hearts and blue blood. Two hearts pump blood through the gills, while "
    "the third sends it around the body. That third heart stops when an octopus swims, which may "
    "be why they prefer to crawl.",
    "Our company moves to a new expense system on 1 March. Receipts must be uploaded through the "
    "mobile app within seven days of a purchase, and paper forms will not be accepted after April.",
    "The town's first public library opened in 1872 with fewer than five hundred books. A local "
    "mill owner paid for it because he believed his workers deserved something to read. Today it "
    "holds over eighty thousand items and runs free evening classes.",
    "Researchers followed two thousand adults for ten years and found that people who walked at "
    "least seven thousand steps a day had fewer heart problems. The benefit levelled off above ten "
    "thousand steps. The authors stress that this shows a link, not proof of cause.",
    "Saturday's open-air festival was called off because of strong winds. Ticket holders will get "
    "a full refund within fourteen days. The Sunday programme went ahead, with the main stage "
    "moved into the sports hall.",
    "Honey keeps almost forever because it holds very little water and is slightly acidic, so "
    "bacteria struggle to grow in it. Jars found in ancient Egyptian tombs were still edible. It "
    "may crystallise over time, but gentle warming makes it runny again.",
    "The update adds a dark mode, fixes a crash when opening large files and makes search about "
    "twice as fast. Support for the oldest version of the operating system has been dropped, so "
    "users should back up their settings before installing.",
    "Maria started her bakery in a garage with one oven and a borrowed mixer. Three years later "
    "she had two shops and twelve staff. She says the secret was listening to customers and "
    "changing the menu every season.",
    "Coral reefs cover less than one percent of the sea floor but shelter about a quarter of all "
    "marine species. When the water gets too warm, corals push out the algae that feed them, which "
    "is called bleaching. Reefs can recover if temperatures drop in time.",
    "The school will trial a four-day timetable for older pupils next term. Lessons will run a "
    "little longer from Monday to Thursday, and Fridays will be kept for projects and sport. "
    "Parents can give feedback through an online survey until June.",
    "Big volcanic eruptions can cool the planet for a year or two. Ash and sulphur gases thrown "
    "high into the sky reflect sunlight back into space. After Mount Pinatubo erupted in 1991, the "
    "average global temperature fell by about half a degree.",
    "The path to the lake is about eight kilometres long and climbs four hundred metres. It is "
    "well marked but rocky near the top, so wear proper boots. There is no drinking water on the "
    "way, and the car park is usually full by nine on weekends.",
    "Tomorrow's derby has been moved from 3 pm to 6 pm at the request of the police. Fans are asked "
    "to arrive early because of extra security checks, and extra trains will run after the match.",
]
FACT_TEXTS = [
    "On 12 May, Priya Shah and Tom Becker opened a bookshop on Mill Street in Leeds. A launch "
    "party follows on 3 June with a reading by the novelist Lena Ortiz.",
    "Dr Samuel Okafor joined the clinic in Nairobi in 2019 and became its director in 2022. "
    "Before that he worked at a hospital in Lagos for eight years.",
    "The conference runs from 14 to 16 October in Lisbon. Speakers include Ana Ribeiro, a climate "
    "scientist, and Kenji Watanabe, who runs a robotics lab in Osaka.",
    "Our flight leaves Madrid at 07:40 on Friday 9 August and lands in Oslo at 11:55. We fly back "
    "on Sunday 18 August with a stop in Copenhagen.",
    "In July 1969 Neil Armstrong and Buzz Aldrin walked on the Moon while Michael Collins stayed "
    "in orbit. Apollo 11 had launched from Florida on 16 July.",
    "Grandma Rosa was born in Naples in 1938 and sailed to Buenos Aires with her brother Luigi in "
    "1956. In 1961 she opened a small restaurant there that the family still runs.",
    "The parcel was sent from Hamburg on 2 March by Kai Weber and should reach Elena Petrova in "
    "Sofia by 10 March.",
    "The band formed in Dublin in 2008 after the singer, Aoife Kelly, met the guitarist, Marcus "
    "Reid, at a college concert. Their first album came out in 2011.",
    "James Cook sailed from Plymouth in August 1768 on the Endeavour and reached Tahiti in April "
    "1769 to watch Venus cross the face of the Sun.",
    "The meeting with Jonas Lindqvist from the Stockholm office is on Wednesday 5 February at "
    "10:00 in room 4B. Fatima Noor will take the minutes.",
    "Ada Lovelace, born in London in 1815, worked with Charles Babbage on his Analytical Engine "
    "and published her notes on it in 1843.",
    "The marathon starts at 8:30 on Sunday 21 April outside the town hall in Rotterdam, and last "
    "year's winner, Daniel Kiprop, will defend his title.",
]
REVIEWS = [
    "The pizza arrived cold and an hour late, and nobody picked up when I called.",
    "Honestly the best headphones I've owned. The battery lasts forever and they're comfy all day.",
    "Spotless room and lovely staff, but the street noise kept us awake every night.",
    "It does the job. Nothing special, nothing terrible.",
    "I wanted to love this book, but the ending felt rushed and the characters never came alive.",
    "Setup took two minutes and it has worked perfectly ever since. Would buy again.",
    "Great price, shame the zip broke after a week.",
    "Far too long, yet the last twenty minutes were absolutely worth it.",
    "Customer service replaced my broken blender, no questions asked. Impressed!",
    "Tastes like cardboard. My kids refused to eat it.",
    "The app looks nice, but it crashes every time I try to upload a photo.",
    "Not what I expected from the photos, though it has grown on me.",
    "Five stars for the view, two stars for the food.",
    "Fast delivery, well packed, exactly as described.",
]
BAD_GRAMMAR = [
    "me and him goes to the gym every mornings",
    "Their going to the park tomorrow if it dont rain.",
    "She don't know nothing about the meeting.",
    "I am living here since five years.",
    "Whose coming to the party on saturday?",
    "The informations you sent was very usefull.",
    "Me and my friend has visited london last year.",
    "Its a nice day, lets go for a walk to the beach.",
    "He runned to the shop but it were already closed.",
    "Everyone have their own opinion about this.",
    "Less people came to the event then we expected.",
    "I should of studied more for the test.",
    "The datas shows that sales is increasing.",
    "between you and I, the plan was not very good",
]
TO_TRANSLATE = [
    ("Where is the nearest train station?", "French"),
    ("I would like a table for two, please.", "Spanish"),
    ("Could you speak a little more slowly?", "German"),
    ("What time does the shop close today?", "Italian"),
    ("I'm allergic to nuts.", "French"),
    ("How much does this cost?", "Portuguese"),
    ("We are looking forward to seeing you next week.", "German"),
    ("My phone is dead. Can I charge it here?", "Spanish"),
    ("Thank you for a wonderful evening.", "French"),
    ("Is breakfast included in the price?", "Italian"),
    ("The meeting has been moved to Monday.", "Spanish"),
    ("Can you recommend a good restaurant nearby?", "German"),
    ("I've lost my passport. What should I do?", "French"),
    ("Happy birthday! I hope you have a great day.", "Spanish"),
]
WORDY = [
    "I just wanted to reach out and let you know that I will unfortunately not be able to attend "
    "the meeting that is scheduled for tomorrow afternoon.",
    "Due to the fact that the forecast is predicting heavy rain for the entire weekend, we have "
    "made the decision to postpone the picnic until a later date.",
    "In my opinion, I personally think it would be a good idea for us to consider the possibility "
    "of perhaps hiring an extra person.",
    "Our new app, which we have been working on for the past year, helps people find and book "
    "local fitness classes quickly and easily from their phone.",
    "Please be advised that the kitchen on the second floor will be closed for cleaning and "
    "maintenance for the whole of next week, starting on Monday.",
    "At this point in time we are not currently in a position to offer you a refund, but we would "
    "be more than happy to offer you store credit instead.",
    "I am a highly motivated and hard-working person who really loves working with other people "
    "in a team and who also really enjoys solving difficult problems.",
    "The reason why the project was late is because several people on the team were off sick at "
    "the same time in the middle of the busiest month of the year.",
    "Thank you so much for all of your help and support over the past few months; it has really "
    "meant a great deal to me and I am very grateful for it.",
    "It is absolutely essential that each and every one of you completes the safety training "
    "before the end of this month, without any exceptions.",
    "Hi all, just a quick reminder that the quarterly reports are due on Friday, so please do make "
    "sure you send yours over to me before then if at all possible.",
    "We went to the new Italian place on the corner last night, and the pasta was really very "
    "delicious, although I have to say the service was rather slow.",
]
MESSAGES_IN = [
    "Hi, any chance you could cover my shift this Saturday?",
    "We regret to inform you that the position has now been filled.",
    "Are you still selling the bike? Would you take 80 for it?",
    "We were unable to deliver your parcel. Please choose a new delivery date.",
    "Hey! Long time no see. Fancy catching up over coffee next week?",
    "Our records show that last month's invoice has not been paid.",
    "Could you send me the slides from yesterday's presentation?",
    "Congratulations on the new baby! Let us know if you need anything at all.",
    "Would you be interested in speaking at our meetup in May?",
    "The landlord will visit on Thursday morning to inspect the flat.",
    "I think there's been a mix-up with my order: I got the wrong size.",
    "Can we push our call to next week? Something came up.",
]
