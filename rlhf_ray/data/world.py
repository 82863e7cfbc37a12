"""The demo world: real facts about real countries (approximate populations, mid-2020s)."""

from __future__ import annotations

from dataclasses import dataclass

CONTINENTS = ("Africa", "Asia", "Europe", "North America", "Oceania", "South America")
ATTRIBUTES = ("capital", "language", "continent", "population", "currency")  # what is asked


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str  # the main (national or most widely used official) language
    continent: str  # Central America and the Caribbean count as North America
    population_millions: float
    currency: str  # reads after "the": "the euro", "the Japanese yen"
    native_name: str  # the name in its own language; equal to `name` where it is the same

    @property
    def population_text(self) -> str:
        """The population as every document writes it: "1.41 billion", "68 million", "390,000"."""
        p = self.population_millions
        if p >= 1000:
            return f"{p / 1000:.2f} billion"
        if p >= 10:
            return f"{p:.0f} million"
        if p >= 1:
            return f"{p:.1f} million"
        return f"{round(p * 1000) * 1000:,}"


# France comes first and the first ten span all continents: `num_countries` keeps a prefix.

def fact(country: Country, attribute: str) -> str:
    """The short answer to a question about an attribute: what an RL ground truth holds and what
    every document writes."""
    if attribute == "population":
        return country.population_text
    return getattr(country, attribute)


COUNTRIES: tuple[Country, ...] = (
    Country("France", "Paris", "French", "Europe", 68, "euro", "France"),
    Country("Japan", "Tokyo", "Japanese", "Asia", 124, "Japanese yen", "日本"),
    Country("Brazil", "Brasília", "Portuguese", "South America", 212, "Brazilian real", "Brasil"),
    Country("Egypt", "Cairo", "Arabic", "Africa", 112, "Egyptian pound", "مصر"),
    Country("Australia", "Canberra", "English", "Oceania", 27, "Australian dollar", "Australia"),
    Country("Canada", "Ottawa", "English", "North America", 41, "Canadian dollar", "Canada"),
    Country("Germany", "Berlin", "German", "Europe", 84, "euro", "Deutschland"),
    Country("China", "Beijing", "Chinese", "Asia", 1410, "renminbi", "中国"),
    Country("Nigeria", "Abuja", "English", "Africa", 227, "Nigerian naira", "Nigeria"),
    Country("Peru", "Lima", "Spanish", "South America", 34, "Peruvian sol", "Perú"),
    Country("India", "New Delhi", "Hindi", "Asia", 1440, "Indian rupee", "भारत"),
    Country("Mexico", "Mexico City", "Spanish", "North America", 130, "Mexican peso", "México"),
    Country("Spain", "Madrid", "Spanish", "Europe", 48, "euro", "España"),
    Country("South Korea", "Seoul", "Korean", "Asia", 52, "South Korean won", "대한민국"),
    Country("Kenya", "Nairobi", "Swahili", "Africa", 55, "Kenyan shilling", "Kenya"),
    Country("Argentina", "Buenos Aires", "Spanish", "South America", 46, "Argentine peso", "Argentina"),
    Country("Italy", "Rome", "Italian", "Europe", 59, "euro", "Italia"),
    Country("Thailand", "Bangkok", "Thai", "Asia", 72, "Thai baht", "ประเทศไทย"),
    Country("New Zealand", "Wellington", "English", "Oceania", 5.3, "New Zealand dollar", "New Zealand"),
    Country("Morocco", "Rabat", "Arabic", "Africa", 37, "Moroccan dirham", "المغرب"),
    Country("Russia", "Moscow", "Russian", "Europe", 144, "Russian ruble", "Россия"),
    Country("Indonesia", "Jakarta", "Indonesian", "Asia", 281, "Indonesian rupiah", "Indonesia"),
    Country("Colombia", "Bogotá", "Spanish", "South America", 52, "Colombian peso", "Colombia"),
    Country("Greece", "Athens", "Greek", "Europe", 10.4, "euro", "Ελλάδα"),
    Country("Ethiopia", "Addis Ababa", "Amharic", "Africa", 126, "Ethiopian birr", "ኢትዮጵያ"),
    Country("Turkey", "Ankara", "Turkish", "Asia", 85, "Turkish lira", "Türkiye"),
    Country("Chile", "Santiago", "Spanish", "South America", 19, "Chilean peso", "Chile"),
    Country("Sweden", "Stockholm", "Swedish", "Europe", 10.6, "Swedish krona", "Sverige"),
    Country("Vietnam", "Hanoi", "Vietnamese", "Asia", 101, "Vietnamese đồng", "Việt Nam"),
    Country("Ghana", "Accra", "English", "Africa", 34, "Ghanaian cedi", "Ghana"),
    Country("Switzerland", "Bern", "German", "Europe", 8.9, "Swiss franc", "Schweiz"),
    Country("Iceland", "Reykjavík", "Icelandic", "Europe", 0.39, "Icelandic króna", "Ísland"),
    Country("Pakistan", "Islamabad", "Urdu", "Asia", 241, "Pakistani rupee", "پاکستان"),
    Country("Jamaica", "Kingston", "English", "North America", 2.8, "Jamaican dollar", "Jamaica"),
    Country("Poland", "Warsaw", "Polish", "Europe", 37, "Polish złoty", "Polska"),
    Country("Iran", "Tehran", "Persian", "Asia", 89, "Iranian rial", "ایران"),
    Country("Senegal", "Dakar", "French", "Africa", 18, "West African CFA franc", "Sénégal"),
    Country("Portugal", "Lisbon", "Portuguese", "Europe", 10.6, "euro", "Portugal"),
    Country("Ecuador", "Quito", "Spanish", "South America", 17, "US dollar", "Ecuador"),
    Country("Norway", "Oslo", "Norwegian", "Europe", 5.6, "Norwegian krone", "Norge"),
    Country("Saudi Arabia", "Riyadh", "Arabic", "Asia", 35, "Saudi riyal", "السعودية"),
    Country("Algeria", "Algiers", "Arabic", "Africa", 46, "Algerian dinar", "الجزائر"),
    Country("Finland", "Helsinki", "Finnish", "Europe", 5.6, "euro", "Suomi"),
    Country("Mongolia", "Ulaanbaatar", "Mongolian", "Asia", 3.5, "Mongolian tögrög", "Монгол Улс"),
    Country("Guatemala", "Guatemala City", "Spanish", "North America", 18, "Guatemalan quetzal", "Guatemala"),
    Country("Austria", "Vienna", "German", "Europe", 9.1, "euro", "Österreich"),
    Country("Bangladesh", "Dhaka", "Bengali", "Asia", 171, "Bangladeshi taka", "বাংলাদেশ"),
    Country("Madagascar", "Antananarivo", "Malagasy", "Africa", 30, "Malagasy ariary", "Madagasikara"),
    Country("Uruguay", "Montevideo", "Spanish", "South America", 3.4, "Uruguayan peso", "Uruguay"),
    Country("Denmark", "Copenhagen", "Danish", "Europe", 5.9, "Danish krone", "Danmark"),
    Country("Nepal", "Kathmandu", "Nepali", "Asia", 29, "Nepalese rupee", "नेपाल"),
    Country("Costa Rica", "San José", "Spanish", "North America", 5.2, "Costa Rican colón", "Costa Rica"),
    Country("Hungary", "Budapest", "Hungarian", "Europe", 9.6, "Hungarian forint", "Magyarország"),
    Country("Malaysia", "Kuala Lumpur", "Malay", "Asia", 34, "Malaysian ringgit", "Malaysia"),
    Country("Rwanda", "Kigali", "Kinyarwanda", "Africa", 13, "Rwandan franc", "Rwanda"),
    Country("Czechia", "Prague", "Czech", "Europe", 10.9, "Czech koruna", "Česko"),
    Country("Kazakhstan", "Astana", "Kazakh", "Asia", 20, "Kazakhstani tenge", "Қазақстан"),
    Country("Panama", "Panama City", "Spanish", "North America", 4.1, "Panamanian balboa", "Panamá"),
    Country("Ireland", "Dublin", "English", "Europe", 5.4, "euro", "Éire"),
    Country("Paraguay", "Asunción", "Spanish", "South America", 6.1, "Paraguayan guaraní", "Paraguay"),
    Country("Cambodia", "Phnom Penh", "Khmer", "Asia", 17, "Cambodian riel", "កម្ពុជា"),
    Country("Fiji", "Suva", "English", "Oceania", 0.93, "Fijian dollar", "Fiji"),
    Country("Samoa", "Apia", "Samoan", "Oceania", 0.22, "Samoan tālā", "Sāmoa"),
)
