"""Word lists and document templates for the bundled demo corpus and the lcsts-mini task.

All text here was written for cpmctl. A `Doc` holds the values fixed for one document (its city, its person, its
date); any other `{slot}` in a template draws a fresh word from `WORDS`. Each topic function returns a document as
a list of paragraphs, the first one being its title. The phrasing is deliberately formulaic: a small model
trained for a few minutes should be able to learn the patterns.
"""

from __future__ import annotations

import random

# ----------------------------------------------------------------------------------------------------------------
# Word lists
# ----------------------------------------------------------------------------------------------------------------

NORTH_CITIES = ["北京", "天津", "沈阳", "大连", "哈尔滨", "长春", "济南", "青岛", "石家庄", "太原", "郑州", "西安",
                "兰州", "西宁", "银川", "呼和浩特", "乌鲁木齐", "洛阳", "唐山", "保定", "秦皇岛", "邯郸", "烟台",
                "威海", "潍坊", "淄博", "临沂", "开封", "安阳", "南阳", "包头", "大同", "宝鸡", "延安", "吉林",
                "齐齐哈尔", "鞍山", "锦州", "营口"]
SOUTH_CITIES = ["上海", "广州", "深圳", "杭州", "南京", "成都", "重庆", "武汉", "长沙", "苏州", "无锡", "宁波", "厦门",
                "福州", "昆明", "贵阳", "南宁", "海口", "合肥", "南昌", "温州", "扬州", "桂林", "珠海", "汕头", "佛山",
                "东莞", "中山", "惠州", "泉州", "漳州", "绍兴", "嘉兴", "湖州", "台州", "金华", "徐州", "常州", "南通",
                "镇江", "芜湖", "安庆", "九江", "赣州", "株洲", "湘潭", "岳阳", "常德", "宜昌", "襄阳", "荆州", "绵阳",
                "宜宾", "遵义", "大理", "丽江", "柳州", "北海", "三亚"]
CITIES = NORTH_CITIES + SOUTH_CITIES
SURNAMES = list("王李张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗梁宋郑谢韩唐冯于董程曹袁邓许傅沈曾彭吕")
GIVEN_NAMES = ["明", "丽", "强", "芳", "伟", "静", "磊", "洋", "敏", "杰", "婷", "涛", "欣", "浩", "宇", "晨", "悦",
               "佳", "凯", "琳", "小雨", "子涵", "一鸣", "思远", "雨桐", "建国", "海燕", "文博", "晓峰", "春华",
               "志强", "丽华", "家豪", "梦婷", "俊杰", "雅琴", "国庆", "秀兰", "立新", "桂英", "宏伟", "玉兰", "振华",
               "淑芬", "少华", "红梅", "天宇", "诗涵", "博文", "欣怡", "浩然", "梓萱", "铁军", "晓东", "美玲", "德明"]
DISTRICTS = ["东城区", "西城区", "南山区", "高新区", "老城区", "滨江区", "开发区", "江北区", "河西区", "城南新区",
             "北湖区", "青山区"]
SEASONS = {1: "冬", 2: "冬", 3: "春", 4: "春", 5: "春", 6: "夏", 7: "夏", 8: "夏", 9: "秋", 10: "秋", 11: "秋", 12: "冬"}


def _num(lo: int, hi: int):
    return lambda rng: str(rng.randint(lo, hi))


def _name(rng: random.Random) -> str:
    return rng.choice(SURNAMES) + rng.choice(GIVEN_NAMES)


WORDS: dict[str, list[str] | object] = {
    "city": CITIES,
    "name": _name,
    "district": DISTRICTS,
    "month": _num(1, 12),
    "day": _num(1, 28),
    "n2": _num(12, 98),
    "n3": _num(120, 980),
    "minutes": _num(10, 40),
    "years": _num(3, 25),
    "hours": _num(2, 9),
    "flower": ["桃花", "樱花", "油菜花", "玉兰花", "杜鹃花", "海棠花"],
    "tree": ["梧桐", "银杏", "枫树", "白杨", "香樟"],
    "fruit": ["苹果", "柿子", "石榴", "梨", "橘子", "葡萄"],
    "wind": ["北风三到四级", "南风二级", "东南风三级", "西北风四到五级", "风力不大", "东风二到三级"],
    "companion": ["家人", "两个大学同学", "几位同事", "父母", "妻子和孩子", "好朋友"],
    "transport": ["高铁", "飞机", "长途汽车", "动车"],
    "shop": ["面包店", "书店", "花店", "咖啡馆", "社区食堂", "理发店", "水果店", "小面馆", "文具店", "修鞋铺"],
    "breakfast": ["肉包子", "煎饼", "烧饼", "鸡蛋饼", "豆浆油条", "菜包子"],
    "commute": ["地铁", "公交车", "电动车", "公司班车", "自行车"],
    "restaurant": ["面馆", "快餐店", "小饭馆", "食堂", "饺子馆"],
    "time": ["六点半", "七点", "七点一刻", "六点四十", "七点半"],
    "end_time": ["五点", "六点", "五点半", "六点半"],
    "mascot": ["猛虎", "飞鹰", "雄狮", "蓝鲸", "火箭", "骏马", "海豚", "猎豹"],
    "site": ["城市生活网", "今日民生网", "快看资讯", "乐活在线", "每日新鲜事网", "小城日报网"],
    "channel": ["本地新闻", "生活", "美食", "旅游", "教育", "体育", "科技"],
    "brand": ["星河", "蓝海", "远航", "青禾", "明光", "云杉", "启明", "长风", "安和", "新桥"],
    "generic_quote": ["这件事办得好，给我们老百姓带来了实实在在的方便。", "以前总觉得不方便，现在好多了。",
                      "希望以后这样的好事越来越多。", "我已经告诉了身边的朋友，大家都觉得不错。",
                      "今天专门带着家里人过来看看，感觉很有意思。"],
}


class Slots(dict):
    """Values fixed for one document; a missing {slot} draws a fresh word from WORDS."""

    def __init__(self, rng: random.Random, fixed: dict):
        super().__init__(fixed)
        self.rng = rng

    def __missing__(self, key):
        source = WORDS[key]
        return source(self.rng) if callable(source) else self.rng.choice(source)


class Doc:
    def __init__(self, rng: random.Random, **fixed):
        self.rng = rng
        self.slots = Slots(rng, fixed)
        self.used: set[str] = set()  # membership only: never iterated, so the output stays deterministic

    def __getitem__(self, key):
        return self.slots[key]

    def __setitem__(self, key, value):
        self.slots[key] = value

    def fill(self, template: str) -> str:
        return template.format_map(self.slots)

    def fill_with(self, template: str, **override) -> str:
        return template.format_map(Slots(self.rng, {**self.slots, **override}))

    def one(self, templates: list[str]) -> str:
        """Fill one template not yet used in this document (a document never repeats its own sentences)."""
        fresh = [t for t in templates if t not in self.used] or templates
        template = self.rng.choice(fresh)
        self.used.add(template)
        return self.fill(template)

    def para(self, *pools: list[str]) -> str:
        return "".join(self.one(pool) for pool in pools)


def new_doc(rng: random.Random, **extra) -> Doc:
    month = rng.randint(1, 12)
    fixed = dict(city=rng.choice(CITIES), name=_name(rng), ta=rng.choice(["他", "她"]), month=str(month),
                 day=str(rng.randint(1, 28)), season=SEASONS[month], district=rng.choice(DISTRICTS))
    fixed.update(extra)
    return Doc(rng, **fixed)


# ----------------------------------------------------------------------------------------------------------------
# Weather
# ----------------------------------------------------------------------------------------------------------------

WEATHER_BY_SEASON = {
    "春": (["晴", "多云", "小雨", "阴转小雨", "晴转多云", "有雾"], (15, 26), (5, 14)),
    "夏": (["晴", "雷阵雨", "大雨", "多云", "晴转雷阵雨"], (29, 38), (22, 28)),
    "秋": (["晴", "多云", "小雨", "阴", "晴转多云"], (16, 27), (8, 17)),
    "冬": (["晴", "阴", "多云", "有雾", "小雪", "中雪"], (-4, 10), (-15, 2)),
}
WEATHER_ADVICE = {
    "雨": "出门记得带好雨具，开车要减速慢行，注意交通安全",
    "雪": "路面湿滑，出行请尽量乘坐公共交通，步行时小心慢走",
    "雾": "雾天能见度较低，驾车出行请打开雾灯，保持安全车距",
    "晴": "白天紫外线较强，外出时可以戴上帽子和太阳镜",
    "云": "天气比较适合户外活动，可以带孩子到公园走一走",
    "阴": "早晚气温偏低，体质较弱的人要注意及时添加衣服",
}
SEASON_SCENES = {
    "春": ["春天的{city}，路边的{flower}陆续开放，公园里到处都是散步的市民。",
          "进入春季以后，{city}的气温慢慢回升，早晚温差比较大。",
          "这几天{city}的{flower}开得正好，不少人趁着周末到郊外踏青。",
          "春风吹过{city}的大街小巷，河边的柳树已经长出了嫩绿的新芽。"],
    "夏": ["盛夏的{city}十分炎热，中午时分街上的行人明显减少。",
          "夏天的{city}雨水较多，一场雷阵雨过后，空气变得清新凉爽。",
          "最近{city}持续高温，游泳馆和商场成了市民避暑的好去处。",
          "夏日的傍晚，{city}的江边吹来阵阵凉风，散步的人渐渐多了起来。"],
    "秋": ["秋天的{city}天高云淡，街道两旁的{tree}叶子渐渐变黄。",
          "入秋以后，{city}早晚已经有了凉意，很多人换上了长袖衣服。",
          "金秋时节，{city}郊区的果园迎来了丰收，{fruit}挂满了枝头。",
          "秋高气爽的日子里，{city}的公园里到处是放风筝的孩子。"],
    "冬": ["冬天的{city}寒风阵阵，不少市民穿上了厚厚的羽绒服。",
          "寒冷的冬日里，{city}的街头飘起了烤红薯的香味。",
          "入冬以后，{city}的白天越来越短，下午五点多天就黑了。"],
}
NORTH_WINTER = ["入冬以来，{city}已经下了好几场雪，孩子们在小区里堆起了雪人。",
                "冬天的{city}室外滴水成冰，好在家家户户都通了暖气，屋里十分暖和。"]
WEATHER_QUOTES = {
    "春": ["“天气暖和了，周末打算带孩子去郊外放风筝。”", "“早上出门还有点凉，中午就得脱外套了。”"],
    "夏": ["“这几天太热了，我每天早上六点就出门买菜，趁凉快把事情办完。”", "“家里的空调从早开到晚，晚上才敢出门散步。”"],
    "秋": ["“这是一年里最舒服的季节，不冷不热，最适合出去走走。”", "“这几天早上送孩子上学，明显感觉凉快了不少。”"],
    "冬": ["“天冷了，我给家里的老人买了新棉衣。”", "“早上起床越来越难了，出门前一定要把围巾戴好。”"],
}


def weather(rng: random.Random) -> list[str]:
    d = new_doc(rng)
    season = d["season"]
    kinds, (hi_lo, hi_hi), (lo_lo, lo_hi) = WEATHER_BY_SEASON[season]
    if season == "冬" and d["city"] in SOUTH_CITIES:
        kinds = ["晴", "阴", "多云", "有雾", "小雨"]
        hi_lo, hi_hi, lo_lo, lo_hi = 10, 18, 2, 9
    d["weather"], d["weather2"] = rng.choice(kinds), rng.choice(kinds)
    d["hi"], d["lo"] = str(rng.randint(hi_lo, hi_hi)), str(rng.randint(lo_lo, lo_hi))
    d["trend"], (lo_step, hi_step) = rng.choice([("略有回升", (1, 3)), ("稍有下降", (-3, -1)), ("变化不大", (-1, 1))])
    d["hi2"] = str(int(d["hi"]) + rng.randint(lo_step, hi_step))
    d["later"] = rng.choice(["逐渐转好", "继续保持晴好", "再次转凉", "有所变化"])
    advice = next(v for k, v in WEATHER_ADVICE.items() if k in d["weather"])
    scenes = SEASON_SCENES[season] + (NORTH_WINTER if season == "冬" and d["city"] in NORTH_CITIES else [])
    title = d.one(["{city}{month}月{day}日天气预报", "{city}今日天气：{weather}，{lo}到{hi}度",
                   "{month}月{day}日{city}天气{weather}"])
    paras = [
        d.one(["{city}气象台{month}月{day}日早上发布消息，今天全市{weather}，最高气温{hi}摄氏度，最低气温{lo}摄氏度，{wind}。",
               "今天是{month}月{day}日，{city}{weather}，白天最高气温{hi}度，夜间最低气温{lo}度，{wind}。",
               "根据{city}气象台的预报，{month}月{day}日{city}{weather}，气温在{lo}度到{hi}度之间，{wind}。"]),
        d.one(scenes) + d.one(scenes) + "气象部门提醒市民，" + advice + "。",
        d.one(["预计明天{city}{weather2}，气温{trend}，最高{hi2}度。", "明天{weather2}，{wind}，气温{trend}，最高{hi2}度。"])
        + d.one(["后天起天气将{later}，{city}气象台将在每天早上七点更新预报。",
                 "未来三天{city}的天气以{weather2}为主，后天起将{later}。"]),
        d.fill("家住{district}的{name}告诉记者：") + rng.choice(WEATHER_QUOTES[season]),
    ]
    return [title] + paras


# ----------------------------------------------------------------------------------------------------------------
# Cooking
# ----------------------------------------------------------------------------------------------------------------

# dish: (main ingredient, second ingredient, how it tastes, how the main ingredient is cut)
DISHES = {
    "番茄炒蛋": ("番茄", "鸡蛋", "酸甜可口", "小块"), "红烧肉": ("五花肉", "冰糖", "肥而不腻", "方块"),
    "清炒白菜": ("白菜", "大蒜", "清淡爽口", "长段"), "酸辣土豆丝": ("土豆", "青椒", "酸辣开胃", "细丝"),
    "鱼香肉丝": ("猪肉", "木耳", "咸甜适中", "细丝"), "宫保鸡丁": ("鸡肉", "花生", "香辣微甜", "小丁"),
    "麻婆豆腐": ("豆腐", "牛肉末", "麻辣鲜香", "小块"), "糖醋排骨": ("排骨", "生姜", "酸甜酥香", "小段"),
    "蒜蓉西兰花": ("西兰花", "大蒜", "清爽脆嫩", "小朵"), "土豆烧牛肉": ("牛肉", "土豆", "软烂入味", "小块"),
    "木须肉": ("猪肉", "鸡蛋", "咸鲜适口", "薄片"), "青椒炒肉": ("青椒", "猪肉", "鲜香下饭", "细丝"),
    "蒜苗炒腊肉": ("腊肉", "蒜苗", "咸香下饭", "薄片"), "凉拌黄瓜": ("黄瓜", "大蒜", "清脆爽口", "小段"),
    "可乐鸡翅": ("鸡翅", "生姜", "甜香入味", "两段"), "韭菜炒鸡蛋": ("韭菜", "鸡蛋", "鲜香可口", "小段"),
    "香菇炖鸡": ("鸡肉", "香菇", "鲜香浓郁", "小块"), "清蒸鲈鱼": ("鲈鱼", "生姜", "鲜嫩清香", "两半"),
}
WORDS.update({
    "occasion": ["工作日的晚餐", "周末的家庭聚会", "带饭上班", "刚学做饭的新手", "一家老小一起吃"],
    "qty": ["一斤", "两个", "三百克", "半斤", "一小把", "四个", "二百克"],
    "seasonings": ["盐、生抽和少许白糖", "料酒、姜片和葱段", "食用油、醋和少许鸡精", "蚝油、生抽和一勺清水",
                   "盐、胡椒粉和几滴香油"],
    "finish": ["撒上一把葱花", "淋上几滴香油", "转大火收一收汤汁", "撒一点白芝麻", "加一小勺盐调味"],
    "fire": ["中火", "大火", "小火"],
})


def cooking(rng: random.Random) -> list[str]:
    dish = rng.choice(list(DISHES))
    ing1, ing2, flavor, shape = DISHES[dish]
    d = new_doc(rng, dish=dish, ing1=ing1, ing2=ing2, flavor=flavor, shape=shape, other=rng.choice([x for x in DISHES if x != dish]))
    title = d.one(["{name}的拿手菜：{dish}", "{city}{name}教你做{dish}", "简单好学的{dish}，{name}的家常做法",
                   "{dish}怎么做才好吃？{name}分享经验"])
    intro = d.one(["{dish}是一道很受欢迎的家常菜，{flavor}，做法也不复杂。",
                   "说起{dish}，很多人都会想起小时候家里的味道。",
                   "今天给大家分享一道{dish}，{flavor}，特别适合{occasion}。",
                   "住在{city}的{name}平时很喜欢下厨，{dish}是{ta}最常做的一道菜。"])
    intro += d.one(["{name}说，这道菜{ta}已经做了{years}年，家里人百吃不厌。",
                    "{name}第一次做这道菜是在{years}年前，后来慢慢摸索出了自己的做法。",
                    "按照{name}的方法，只要{minutes}分钟就能端上桌。"])
    ingredients = d.fill("准备材料：{ing1}{qty}，{ing2}{qty}，另外还需要{seasonings}。")
    steps = d.one([
        "第一步，把{ing1}洗干净，切成{shape}备用。第二步，锅中倒油，油热后放入{ing2}，用{fire}翻炒{n2}秒。"
        "第三步，加入{ing1}和{seasonings}，继续翻炒均匀，最后{finish}就可以出锅了。",
        "先把{ing1}和{ing2}处理干净，{ing1}切成{shape}。锅烧热以后倒入少量食用油，先放{ing2}，"
        "再放{ing1}，用{fire}炒到{ing1}变软。接着加入{seasonings}，{finish}，这道菜就完成了。",
        "做这道菜的关键在于火候。{ing1}切成{shape}以后，先用开水焯一下，捞出沥干。锅里放油，"
        "把{ing2}炒香，再倒入{ing1}，加上{seasonings}，用{fire}翻炒几分钟，出锅前{finish}。",
    ])
    tip = "小贴士：" + d.one(["炒{ing1}的时候火不要太大，否则很容易糊锅。",
                           "{ing1}提前用盐腌十分钟，味道会更好。",
                           "如果喜欢吃辣，可以加入几个干辣椒一起炒。",
                           "汤汁不要收得太干，留一点拌米饭非常好吃。",
                           "{ing2}一定要选新鲜的，做出来的菜才好吃。"])
    tip += d.one(["这是{name}做了很多次才总结出来的经验。", "这一点{name}特别提醒了好几次。",
                  "{name}说，掌握了这一点，新手也能做得很好。"])
    end = d.one(["这道菜{flavor}，{name}一家人每次都吃得干干净净。",
                 "做好的菜色香味俱全，搭配一碗米饭，就是一顿简单又满足的晚餐。",
                 "周末有空的时候，不妨跟着{name}的方法，给家人做一盘{dish}吧。"])
    end += d.one(["{name}还说，下次要教大家做{other}。", "你家的这道菜是怎么做的？欢迎和{name}交流。",
                  "据{name}统计，这道菜在{ta}家的饭桌上一个月要出现{hours}次。"])
    return [title, intro, ingredients, steps, tip, end]


# ----------------------------------------------------------------------------------------------------------------
# Travel
# ----------------------------------------------------------------------------------------------------------------

SIGHTS = {
    "古城": "城墙保存得很完整，站在城楼上可以看到大半个城市。",
    "老街": "街道两旁都是几十年前的老房子，小店里卖着各种手工艺品和传统小吃。",
    "博物馆": "馆里陈列着许多珍贵的文物，讲解员把每件文物背后的故事讲得生动有趣。",
    "湿地公园": "园里有大片的芦苇和水塘，运气好的话还能看到白鹭从水面上飞过。",
    "植物园": "园里种着上千种植物，温室里的热带花草让人仿佛来到了另一个世界。",
    "夜市": "天一黑，夜市就热闹起来了，烤串、凉粉、炒饭的香味飘满了整条街。",
    "海边栈道": "栈道沿着海岸线修建，一边是礁石和海浪，一边是绿树和花丛。",
    "山顶观景台": "我们沿着石阶爬了一个多小时，站在观景台上，整座城市尽收眼底。",
    "古镇": "小河从镇子中间穿过，河上有好几座石拱桥，乘船游览别有一番风味。",
    "科技馆": "馆里有很多可以动手操作的展品，孩子们玩得舍不得离开。",
}
WORDS.update({
    "localfood": ["米粉", "烤鸭", "小笼包", "热干面", "肉夹馍", "火锅", "羊肉串", "海鲜粥", "糖水", "烧饼",
                  "凉皮", "酸菜鱼", "牛肉面", "豆腐脑"],
    "shop_age": ["开了二十多年", "开了三十年", "只有几张桌子", "排着长队", "当地人推荐"],
    "taste": ["味道果然名不虚传", "吃完以后大家都说还想再来一碗", "价格不贵，分量还很足", "老板还热情地给我们介绍了吃法"],
    "weather_word": ["比较凉快", "偶尔下雨", "阳光很好", "早晚温差大"],
    "travel_tip": ["避开节假日出行，人会少很多", "提前在网上预订门票", "穿一双舒服的鞋，因为要走很多路",
                   "早上早点出门，人少，光线也好", "带上充电宝和雨伞，以防万一"],
})


def travel(rng: random.Random) -> list[str]:
    d = new_doc(rng, home=rng.choice(CITIES), days=rng.choice(["两", "三", "四"]),
                localfood=rng.choice(WORDS["localfood"]))
    sight1, sight2 = rng.sample(list(SIGHTS), 2)
    d["sight1"], d["sight2"] = sight1, sight2
    title = d.one(["{name}的{city}{days}日游记", "和{name}一起去{city}看{sight1}", "{name}的{city}之旅",
                   "{month}月的{city}，{name}说值得一去"])
    go = d.one(["{month}月初，我和{companion}坐{transport}从{home}出发，大约{hours}个小时就到了{city}。",
                "趁着假期，我和{companion}决定去{city}走一走。从{home}坐{transport}过去，只要{hours}个小时。",
                "这次去{city}是{name}提议的，我们一行人从{home}出发，坐了{hours}个小时的{transport}。"])
    go += d.one(["一出车站，就感受到了这座城市的热情。", "到达的时候正是傍晚，街上已经亮起了灯。",
                 "安顿好住处以后，我们先在附近吃了一顿简单的午饭。"])
    day1 = d.fill("第一天，我们去了{city}的{sight1}。") + SIGHTS[sight1] + d.one(
        ["我们在这里待了整整一个上午。", "同行的{name}拍了好几百张照片。", "门票{n2}元，学生可以半价。"])
    day2 = d.fill("第二天，我们去了{sight2}。") + SIGHTS[sight2] + d.one(
        ["虽然有点累，但是大家都觉得很值得。", "这里比我们想象的还要好。", "不知不觉就到了下午。"])
    food = d.one(["说到吃，{city}的{localfood}一定不能错过。", "来{city}不吃{localfood}，就等于白来了一趟。"])
    food += d.one(["我们在一家{shop_age}的小店里点了{localfood}，{taste}。",
                   "{name}带我们找到了一家{shop_age}的老店，{taste}。"])
    tip = d.one(["如果你也想去{city}，建议{travel_tip}。", "给想去{city}的朋友一个小建议：{travel_tip}。"])
    tip += d.one(["另外，{city}的公交和地铁都很方便，不用打车也能去大部分景点。",
                  "{city}的{month}月{weather_word}，出门前最好看一看天气预报。"])
    end = d.one(["{days}天的时间过得很快，回程的{transport}上，我已经开始计划下一次旅行了。",
                 "这次{city}之旅让我们留下了很多美好的回忆，以后有机会一定还要再来。"])
    return [title, go, day1, day2 + food, tip + end]


# ----------------------------------------------------------------------------------------------------------------
# School
# ----------------------------------------------------------------------------------------------------------------

SUBJECT_ACTS = {
    "数学": "在黑板上讲解了一道几何题，又让几位同学上台演算",
    "语文": "带大家朗读了一篇描写秋天的课文，还让同学们说一说自己最喜欢的句子",
    "英语": "让同学们两人一组练习对话，练习的题目是问路和指路",
    "物理": "用小车和木板做了一个实验，让大家观察速度是怎样变化的",
    "化学": "在讲台上演示了酸和碱的反应，试管里的溶液一下子变了颜色",
    "生物": "带来了几台显微镜，让大家轮流观察洋葱表皮的细胞",
    "历史": "讲了一段关于古代丝绸之路的故事，同学们听得入了迷",
    "地理": "在地图上指出了长江流经的省份，又讲了长江名称的由来",
    "美术": "教大家用水彩画一幅校园风景，画得最好的作品会贴在教室后面",
    "音乐": "教大家唱了一首新歌，还给大家介绍了几种民族乐器",
    "体育": "带大家在操场上练习了跳远和接力跑",
}
WORDS.update({
    "schoolname": ["第一中学", "实验小学", "第二中学", "外国语学校", "育才中学", "阳光小学", "第三中学", "新华小学"],
    "break_act": ["在走廊里讨论刚才的数学题", "到操场上跳绳", "围在一起看一本新买的漫画书", "给教室里的绿萝浇水",
                  "下了一盘五子棋"],
    "after": ["{name}参加了学校的合唱队排练", "{name}和几个同学在操场上打了一会儿篮球",
              "{name}去学校图书室借了两本书", "{name}留下来做值日，把教室打扫得干干净净"],
    "evening": ["读半个小时的课外书", "陪爷爷下一盘象棋", "和妈妈一起出门散步", "练一会儿钢琴", "画一幅画"],
    "squote": ["每天都过得很充实，我很喜欢现在的学校。", "虽然学习有点紧张，但是和同学们在一起很开心。",
               "我最喜欢的是{subject}课，以后想当一名{subject}老师。"],
    "teacher": _name,
})


def school(rng: random.Random) -> list[str]:
    schoolname = rng.choice(WORDS["schoolname"])
    grades = ["三年级", "四年级", "五年级", "六年级"] if "小学" in schoolname else ["初一", "初二", "初三", "高一", "高二"]
    s1, s2 = rng.sample(list(SUBJECT_ACTS), 2)
    d = new_doc(rng, schoolname=schoolname, grade=rng.choice(grades), subject=s1, subject2=s2,
                teacher1=_name(rng), teacher2=_name(rng))
    title = d.one(["{city}{schoolname}{grade}学生的一天", "{name}的校园生活", "走进{city}{schoolname}的{grade}教室"])
    morning = d.one(["{name}是{city}{schoolname}{grade}的学生。每天早上{time}，{ta}就背着书包出门了。",
                     "{name}今年在{city}{schoolname}读{grade}，家离学校不远，每天早上{time}出门。"])
    morning += d.one(["从家到学校要走{minutes}分钟，路上会经过一家早点铺，{ta}常常在那里买一个{breakfast}。",
                      "路上{ta}会和住在同一个小区的同学一起走，边走边聊昨天看过的书。"])
    class1 = d.fill("上午第一节是{subject}课。{teacher1}老师") + SUBJECT_ACTS[s1] + "。" + d.one(
        ["同学们听得很认真。", "教室里不时传来笑声。", "下课铃响了，大家还意犹未尽。"])
    class2 = d.fill("第三节是{subject2}课，{teacher2}老师") + SUBJECT_ACTS[s2] + "。" + d.one(
        ["{name}觉得这节课特别有意思。", "{name}在笔记本上认真记下了要点。"])
    rest = d.fill("课间休息时，{name}和同学们{break_act}。下午放学后，") + d.fill(d.rng.choice(WORDS["after"])) + "。"
    evening = d.fill("晚上，{name}先把作业做完，再{evening}。{ta}说：“") + d.fill(d.rng.choice(WORDS["squote"])) + "”"
    return [title, morning, class1, class2, rest, evening]


# ----------------------------------------------------------------------------------------------------------------
# Work
# ----------------------------------------------------------------------------------------------------------------

WORDS.update({
    "profession": ["程序员", "设计师", "会计", "销售经理", "产品经理", "工程师", "客服专员", "编辑", "数据分析师",
                   "人事专员"],
    "overtime": ["二十", "三十", "四十"],
    "morning_task": ["把今天要做的事情列在本子上", "回复了几封邮件", "泡了一杯茶，看了看昨天的工作记录",
                     "检查了一遍昨天提交的报告"],
    "meeting": ["轮流说了说昨天的进展和今天的计划", "讨论了客户提出的新需求", "商量了下个月的工作安排",
                "一起看了上周的数据"],
    "project": ["开发一款帮助老人预约挂号的小程序", "整理去年的销售数据", "准备一场新产品发布会",
                "改进公司网站的页面设计", "培训新入职的同事", "和外地的客户谈一份合作协议"],
    "lunch_chat": ["大家边吃边聊周末的安排", "有人说起了最近看过的一部电影", "几个人商量着周末一起去爬山",
                   "话题很快就转到了孩子的学习上"],
    "after_work": ["去小区附近的健身房锻炼一个小时", "去菜市场买了些菜，回家做晚饭", "和朋友约在一家小饭馆吃饭",
                   "在回家的地铁上听了一会儿书", "去公园跑了五公里"],
    "wquote": ["工作虽然忙，但是每天都能学到新东西。", "只要把事情一件一件做好，心里就踏实。",
               "我最喜欢的是和同事们一起解决难题的感觉。", "希望明年能带领团队做出更好的成绩。"],
})


def work(rng: random.Random) -> list[str]:
    d = new_doc(rng, company=rng.choice(WORDS["brand"]) + rng.choice(["科技公司", "设计公司", "贸易公司", "出版社"]),
                profession=rng.choice(WORDS["profession"]))
    title = d.one(["{company}{profession}{name}的一天", "在{city}上班的{profession}{name}",
                   "{name}：一名{profession}的日常"])
    commute = d.one(["{name}是{city}{company}的一名{profession}。每天早上{time}，{ta}坐{commute}去公司，路上大约需要{minutes}分钟。",
                     "{name}在{city}的{company}工作了{years}年，是一名{profession}。{ta}每天坐{commute}上班，单程{minutes}分钟。"])
    morning = d.fill("到了公司，{ta}先{morning_task}，然后参加团队的晨会。会上，大家{meeting}。")
    project = d.one(["这个月，{name}所在的团队正在{project}。", "最近{name}的主要任务是{project}。"])
    project += d.one(["任务很紧，大家每天都要加班{overtime}分钟。", "经理要求在{month}月底以前完成。",
                      "团队一共{hours}个人，分工很明确。"])
    lunch = d.fill("中午，{name}和同事们一起去公司楼下的{restaurant}吃饭，{lunch_chat}。")
    evening = d.fill("下午{end_time}下班后，{ta}{after_work}。{name}说：“{wquote}”")
    return [title, commute + morning, project, lunch, evening]


# ----------------------------------------------------------------------------------------------------------------
# Science facts
# ----------------------------------------------------------------------------------------------------------------

FACTS = [
    ("水为什么会结冰", "在一个标准大气压下，水的温度降到零摄氏度时就会开始结冰。结冰以后，水的体积会变大，所以冬天装满水的玻璃瓶有时会被冻裂。"),
    ("冰为什么会浮在水面上", "冰的密度比液态水小，所以冰块会浮在水面上。正因为这样，冬天湖面结冰以后，冰层下面的水仍然可以让鱼儿生活。"),
    ("月亮为什么会发光", "月球本身并不发光，我们看到的月光其实是月球表面反射的太阳光。月亮的圆缺变化，是因为被太阳照亮的那部分在我们看来不断变化。"),
    ("一年为什么有四季", "地球绕着太阳公转，同时地轴是倾斜的。一年中太阳光照射的角度不断变化，于是就有了春夏秋冬四个季节。"),
    ("彩虹是怎样形成的", "雨后空气中飘着许多小水滴，阳光照进水滴时发生折射和反射，被分成不同颜色的光，这样天空中就出现了彩虹。"),
    ("为什么先看见闪电后听见雷声", "闪电和雷声其实是同时产生的。光的速度大约是每秒三十万千米，声音在空气中的速度只有每秒三百四十米左右，所以光总是比声音先到达我们这里。"),
    ("植物怎样制造养分", "绿色植物的叶子里有叶绿素，它们利用阳光，把二氧化碳和水变成养分，同时放出氧气。这个过程叫做光合作用。"),
    ("人体有多少块骨头", "成年人的身体里大约有二百零六块骨头。刚出生的婴儿骨头数量更多，有些骨头会在长大的过程中慢慢长在一起。"),
    ("天空为什么是蓝色的", "阳光里包含各种颜色的光，其中蓝光更容易被空气中的分子散射，散射的蓝光布满天空，所以晴天的天空看起来是蓝色的。"),
    ("为什么会有白天和黑夜", "地球不停地自转，大约二十四小时转一圈。面向太阳的一面是白天，背对太阳的一面是黑夜。"),
    ("声音是怎样产生的", "声音是由物体振动产生的。我们说话时，喉咙里的声带在振动；敲鼓时，鼓面在振动。振动停止了，声音也就消失了。"),
    ("磁铁为什么能吸铁", "磁铁周围存在磁场，铁、钴、镍等物质在磁场中会被吸引。磁铁有南极和北极，同极相互排斥，异极相互吸引。"),
    ("海水为什么是咸的", "河流在流淌的过程中会把岩石和土壤中的盐分带进大海，海水不断蒸发，盐分却留了下来，经过很长的时间，海水就变得越来越咸。"),
    ("人为什么要多喝水", "水约占成年人体重的百分之六十。人体的消化、呼吸和调节体温都离不开水，所以每天要注意补充足够的水分。"),
    ("树干上的年轮是怎么来的", "在四季分明的地方，树木春夏长得快，秋冬长得慢，于是树干的横截面上会留下一圈一圈的纹路。数一数年轮，就能大致知道一棵树的年龄。"),
    ("食物为什么会变质", "空气中和物体表面有许多细菌和霉菌，温度适宜时它们会快速繁殖，使食物变质。把食物放进冰箱，可以减慢它们繁殖的速度。"),
    ("候鸟为什么要迁徙", "很多鸟类在秋天飞往温暖的南方过冬，春天再回到北方繁殖。它们迁徙主要是为了寻找充足的食物和适宜的气候。"),
    ("为什么高山上比山下冷", "离地面越高，空气越稀薄，保存热量的能力就越差。一般来说，海拔每升高一千米，气温大约下降六摄氏度。"),
    ("铁为什么会生锈", "铁和空气中的氧气、水分接触以后，会慢慢发生化学反应，生成红褐色的铁锈。给铁制品刷上油漆，可以让它不容易生锈。"),
    ("我们为什么能看见东西", "光线照到物体上，再反射进我们的眼睛，在视网膜上成像，大脑处理这些信号以后，我们就看见了物体。"),
    ("蚂蚁是怎样认路的", "蚂蚁在爬行时会留下一种特殊的气味，后面的同伴闻着这种气味，就能找到食物和回家的路。"),
    ("潮水为什么会涨落", "海水每天会有规律地上涨和下落，这叫做潮汐。潮汐主要是月球的引力造成的，太阳的引力也有一定的影响。"),
    ("恐龙生活在什么时候", "恐龙生活在距今大约两亿三千万年到六千六百万年前。关于它们灭绝的原因，目前比较多的科学家认为与一颗小行星撞击地球有关。"),
    ("为什么冬天呼出的气是白色的", "人呼出的气体里含有水蒸气。冬天外面的空气很冷，水蒸气遇冷以后变成了许多非常小的水滴，看起来就像一团白雾。"),
    ("为什么会有回声", "声音碰到高墙、山崖等障碍物时会被反射回来。如果反射回来的声音和原来的声音相隔足够长的时间，我们就能听到回声。"),
]
WORDS.update({
    "situation": ["下雨", "出门散步", "去公园", "和家人聊天", "抬头看天空", "去海边"],
    "venue": ["科技馆", "少年宫", "社区图书馆", "青少年活动中心"],
})
FACT_INTROS = [
    "在{city}{venue}的科普讲座上，一个小朋友问：“{q}？”主讲人{name}笑着解释说：",
    "“{q}？”这是{name}的孩子最近常问的问题。查了资料以后，爸爸妈妈这样告诉孩子：",
    "{name}老师在科学课上讲到了“{q}”这个问题。老师告诉同学们：",
    "很多人都想过“{q}”这个问题。{venue}的讲解员{name}给出了答案：",
    "有位读者来信问：{q}？科普作者{name}回答说：",
]


def science(rng: random.Random) -> list[str]:
    d = new_doc(rng)
    picks = rng.sample(FACTS, 3)
    title = d.one(["{name}的科普小课堂", "{name}老师讲科学：三个有趣的问题", "{city}{venue}科普问答{small}则"])
    opening = d.one(["生活中有很多有趣的现象，背后都藏着科学道理。今天{name}和大家聊一聊其中的三个。",
                     "{city}{venue}本周举办了一场面向中小学生的科普活动，吸引了{n2}0多名学生参加。",
                     "科学就在我们身边。{name}整理了几个孩子们最常问的问题，和大家一起分享。"])
    # Each fact paragraph has its own speaker.
    intros = rng.sample(FACT_INTROS, len(picks))
    body = [d.fill_with(intro.replace("{q}", q), name=_name(rng)) + fact for intro, (q, fact) in zip(intros, picks)]
    closing = d.one(["{name}说，了解了这些知识，下次{situation}的时候，你就能给身边的人讲一讲其中的道理了。",
                     "{name}说，只要平时多观察、多思考，每个人都能发现很多有趣的问题。",
                     "活动结束时，{name}鼓励大家回家以后自己动手做一做小实验，把看到的现象记录下来。"])
    return [title, opening] + body + [closing]


# ----------------------------------------------------------------------------------------------------------------
# City life
# ----------------------------------------------------------------------------------------------------------------

WORDS.update({
    "place": ["十字路口", "地铁站旁", "小区门口", "老街拐角", "菜市场对面"],
    "evening_scene": ["跳广场舞的阿姨们排成了整齐的队伍", "孩子们骑着自行车一圈一圈地转", "几位老人围在一起下象棋",
                      "卖糖葫芦和烤玉米的小摊前排起了队", "年轻人在篮球场上打得热火朝天"],
    "change": ["小区门口通了地铁", "家附近多了一个口袋公园", "老旧小区装上了电梯", "菜市场变得又干净又整齐",
               "街道两边种满了绿树", "楼下开了一家社区食堂"],
    "service": ["开设了老年人助餐点，一顿饭只要十几块钱", "在楼下安装了快递柜，取快递不用再排队",
                "组织志愿者每周为老人免费理发", "在周末举办便民服务集市，修伞、磨刀、配钥匙样样都有",
                "请来医生每月为居民量血压、讲健康知识"],
    "subway_scene": ["人潮涌动，但是大家都自觉排队上车", "车厢里很多人戴着耳机，安静地看着手机",
                     "每隔两三分钟就有一趟车，等车的时间并不长"],
    "cquote": ["住在这里越来越方便了，出门走几步就能买到想要的东西。", "邻居们相处得很好，谁家有事大家都会帮忙。",
               "这几年变化太大了，我都快认不出来了。", "最开心的是孙子放学以后有地方玩了。"],
})


CITY_POOLS = [
    ["最近，{city}{district}的{place}新开了一家{shop}，开业那天吸引了不少附近的居民。",
     "{district}{place}的那家{shop}已经开了{years}年，老板{owner}和街坊们都很熟。"],
    ["每天傍晚，{district}的广场上都很热闹，{evening_scene}。", "到了晚上，{district}的街心花园里，{evening_scene}。"],
    ["{name}在{district}住了{years}年，{ta}说这些年最大的变化是{change}。",
     "说起这些年的变化，在{district}住了{years}年的{name}首先想到的是{change}。"],
    ["为了方便居民，社区{service}。", "{district}的社区工作人员介绍，社区今年{service}。"],
    ["早高峰的{city}地铁{subway_scene}。", "每天早上八点前后，{city}的地铁{subway_scene}。"],
    ["周末的早上，{district}的早市{n2}个摊位一字排开，新鲜的蔬菜水果摆得满满当当。",
     "{district}的早市每天五点半开张，{owner}在这里卖了{years}年的豆腐。"],
    ["{district}新修了一条{small}公里长的绿道，晚饭后来这里散步、骑车的人越来越多。",
     "{district}的河边步道重新整修以后，成了附近居民最喜欢去的地方。"],
]


def city_life(rng: random.Random) -> list[str]:
    d = new_doc(rng, owner=_name(rng))
    title = d.one(["{city}{district}：{name}家门口的新变化", "{name}的{city}{district}一天", "住在{city}{district}是一种什么体验？{name}说说",
                   "{name}眼中的{city}{district}"])
    pools = rng.sample(CITY_POOLS, 6)
    paras = [d.one(pools[i]) + d.one(pools[i + 1]) for i in range(0, 6, 2)]
    paras.append(d.fill("{name}说：“{cquote}”"))
    return [title] + paras


# ----------------------------------------------------------------------------------------------------------------
# Sports
# ----------------------------------------------------------------------------------------------------------------

SPORT_PLAY = {
    "篮球": ["比赛开始后，两队的进攻都不太顺利，首节战罢{t1}仅领先{small}分。",
           "第三节{t1}打出一波{small}比0的进攻高潮，一举拉开了比分。",
           "{player}全场拿下{n2}分，是本场比赛得分最多的球员。"],
    "足球": ["上半场第{half_minute}分钟，{t1}的{player}接队友传球后起脚射门，皮球直入球网。",
           "下半场{t2}加强了进攻，但{t1}的门将{player2}几次做出精彩扑救。",
           "比赛最后阶段，主队稳住防守，把领先优势保持到了终场。"],
    "排球": ["首局比赛双方比分交替上升，{t1}凭借{player}的连续扣球先下一城。",
           "第二局{t2}调整了发球策略，一度取得领先，但主队很快追了回来。",
           "关键时刻，{player}的拦网得分让全场观众站起来鼓掌。"],
}
WORDS.update({
    "small": _num(3, 9),
    "half_minute": _num(5, 44),
    "coach_quote": ["队员们今天的防守做得很好，这是我们赢球的关键。", "比赛比我们想象的要艰难，对手给了我们很大的压力。",
                    "我们还有很多需要改进的地方，下一场要打得更好。", "感谢球迷们的支持，主场的气氛给了队员们很大的信心。"],
    "exercise": ["跑步", "游泳", "打羽毛球", "骑自行车", "练太极拳", "跳绳"],
})


def sports(rng: random.Random) -> list[str]:
    sport = rng.choice(list(SPORT_PLAY))
    c1, c2, c3 = rng.sample(CITIES, 3)
    m1, m2, m3 = rng.sample(WORDS["mascot"], 3)
    if sport == "篮球":
        s1 = rng.randint(88, 120)
        s2 = s1 - rng.randint(2, 15)
    elif sport == "足球":
        s2 = rng.randint(0, 2)
        s1 = s2 + rng.randint(1, 2)
    else:
        s1, s2 = 3, rng.randint(0, 2)
    d = new_doc(rng, city=c1, sport=sport, team1=f"{c1}{m1}队", team2=f"{c2}{m2}队", team3=f"{c3}{m3}队",
                t1=f"{m1}队", t2=f"{m2}队",
                s1=str(s1), s2=str(s2), player=_name(rng), player2=_name(rng), name2=_name(rng),
                round=str(rng.randint(2, 30)))
    title = d.one(["{sport}联赛：{t1}主场击败{t2}", "{t1}主场迎来本赛季第{small}胜", "{city}球迷见证{t1}主场取胜"])
    report = d.one(["{month}月{day}日晚，{sport}联赛第{round}轮在{city}体育中心打响，主队{team1}以{s1}比{s2}战胜了客队{team2}。",
                    "{month}月{day}日，{team1}在主场迎战{team2}，最终以{s1}比{s2}取得胜利。"])
    report += d.one(["现场{n2}00多名观众为主队加油助威。", "这也是主队最近{small}场比赛中的第二场胜利。"])
    play = [d.fill(t) for t in SPORT_PLAY[sport]]
    coach = d.fill("赛后，主队主教练{name}表示：“{coach_quote}”")
    coach += d.one(["客队主教练则认为，球队输在了细节上。", "{t2}的队员们赛后向远道而来的球迷鞠躬致谢。"])
    nxt = d.one(["下一轮比赛，{t1}将在客场挑战{team3}。", "按照赛程，{t1}下周将回到主场迎战{team3}。"])
    fan = d.one(["球迷{name2}说：“我看了{small}年{sport}比赛，今天这一场是最精彩的之一。”",
                 "{name2}平时喜欢{exercise}，今天专门带着孩子来看{sport}比赛。"])
    return [title, report, play[0] + play[1], play[2] + coach, nxt + fan]


# ----------------------------------------------------------------------------------------------------------------
# History anecdotes (composed legends, told as legends)
# ----------------------------------------------------------------------------------------------------------------

LEGENDS = [
    ("村子里遭遇了大旱，河水几乎干涸，庄稼都枯死了",
     "带着村民们在山脚下找水，一连挖了四十多天，终于挖出了一口清凉的深井",
     "井水常年不干，全村人再也不用为喝水发愁", "口井", "井"),
    ("村口的小河涨了大水，冲毁了村里唯一的一座木桥，孩子们没法过河去读书",
     "拿出自己多年的积蓄，又请来几位石匠，用了整整三个月在河上建起了一座石桥",
     "石桥经历了几百年的风雨，至今还立在河上", "座桥", "桥"),
    ("附近几个村子流行起一种怪病，很多人发烧咳嗽，一病就是好几天",
     "翻山越岭采来草药，熬成汤药，挨家挨户送给生病的乡亲",
     "乡亲们的病慢慢好了起来", "条山路", "路"),
    ("连续几年庄稼歉收，很多人家连饭都吃不上",
     "一次次上山试种，终于找到了一种能在山坡上生长的耐旱作物，又把种子分给了大家",
     "山坡上从此长满了庄稼，村里人的日子一天天好了起来", "片山坡", "坡"),
    ("村后的荒山上光秃秃的，一刮大风，黄沙就吹进了村子",
     "每年春天都带着儿孙上山种树，一种就是几十年",
     "荒山变成了青山，风沙再也吹不进村子", "片树林", "林"),
]
WORDS.update({
    "dynasty": ["唐朝", "宋朝", "元朝", "明朝", "清朝"],
    "profession_old": ["木匠", "郎中", "书生", "铁匠", "茶农", "渔夫", "教书先生"],
    "virtue": ["忠厚老实", "乐于助人", "勤劳能干", "心地善良"],
    "moral": ["要多为别人着想", "遇到困难不要轻易放弃", "做人要踏踏实实", "好事要一件一件去做"],
})


def history(rng: random.Random) -> list[str]:
    problem, action, result, measure, suffix = rng.choice(LEGENDS)
    surname = rng.choice(SURNAMES)
    hero = surname + rng.choice(["守义", "文远", "明德", "长庚", "秀英", "春娘", "大山", "有福", "德厚", "子安",
                                 "承志", "广仁", "秋菊", "春生", "永年", "怀远", "敬之", "翠兰", "宝山", "满仓"])
    d = new_doc(rng, hero=hero, surname=surname, problem=problem, action=action, result=result,
                dynasty=rng.choice(WORDS["dynasty"]), job=rng.choice(WORDS["profession_old"]))
    d["landmark"] = surname + "公" + suffix
    title = d.one(["{city}的传说：{hero}与{landmark}", "{dynasty}{job}{hero}的故事", "{city}{landmark}名字的由来"])
    setting = d.one(["相传{dynasty}年间，{city}附近的一个小村子里住着一位{job}，名叫{hero}。",
                     "很久很久以前，大约是在{dynasty}，{city}城外有个小村庄，村里有一位{job}叫{hero}。"])
    setting += d.fill("{hero}为人{virtue}，村里人都很敬重{ta}。")
    trouble = d.fill("有一年，{problem}。") + d.one(["大家急得团团转，却想不出好办法。", "有的人家已经收拾行李，准备搬到外地去了。"])
    deed = d.fill("{hero}{action}。") + d.one(["那段时间，{ta}几乎每天天不亮就出门，天黑了才回家。",
                                             "有人劝{ta}不要这么辛苦，{ta}只是笑笑，说：“大家的事，就是我的事。”"])
    after = d.fill("后来，{result}。为了纪念{hero}，人们把这" + measure + "叫做“{landmark}”。")
    moral = d.one(["这个故事在{city}一带流传了几百年，老人们常用它来教育孩子{moral}。",
                   "如今，来{city}游玩的人还常常专门去看一看{landmark}，听当地人讲一讲{hero}的故事。"])
    moral += d.fill("当然，这只是一个传说，但它告诉人们的道理一直没有过时。")
    return [title, setting + trouble, deed, after + moral]


# ----------------------------------------------------------------------------------------------------------------
# News items (the corpus carries them as articles; lcsts-mini turns them into input -> headline pairs)
# ----------------------------------------------------------------------------------------------------------------

# (kind, organisation, verb, object, modifiers, details). A headline is always city + organisation + verb + object.
EVENTS = [
    ("activity", "第一中学", "举办", "春季运动会", ["第十二届", "一年一度的", ""],
     ["全校{n3}名学生参加了跑步、跳远和拔河等比赛项目。", "校长表示，举办运动会是为了让学生们走出教室，多参加体育锻炼。"]),
    ("activity", "实验小学", "开展", "读书月活动", ["为期一个月的", ""],
     ["活动期间，学校图书室每天延长开放一个小时。", "学生们还可以把自己读过的好书推荐给同学。"]),
    ("service", "人民医院", "开设", "夜间门诊", ["", "内科和儿科"],
     ["夜间门诊每天从下午六点开放到晚上十点。", "医院负责人介绍，这项措施主要是为了方便白天上班的市民看病。"]),
    ("activity", "中医院", "举办", "义诊活动", ["一场", "大型"],
     ["{n2}名医生在医院门口为市民免费测量血压，提供健康咨询。", "不少老人一大早就来排队。"]),
    ("service", "图书馆", "延长", "开放时间", ["周末的", "阅览室的"],
     ["调整以后，图书馆每天早上八点开门，晚上九点闭馆。", "不少学生表示，以后放学了也能来图书馆看书。"]),
    ("service", "图书馆", "新增", "自助借书机", ["{small}台", "一批"],
     ["读者只要刷一下借书证，几秒钟就能办好借书手续。", "工作人员说，今年还将新增两万册图书。"]),
    ("activity", "人民公园", "举办", "菊花展", ["第{small}届", "秋季"],
     ["展出的菊花品种超过{n2}个。", "花展将持续一个月，市民可以免费入园参观。"]),
    ("service", "湿地公园", "开放", "观鸟步道", ["一条新的", ""],
     ["步道全长{small}公里，沿途设有多个观鸟平台。", "每年冬天，有上千只候鸟在这里过冬。"]),
    ("service", "地铁集团", "开通", "三号线", ["", "新建成的"],
     ["新线路全长{n2}公里，共设{small}座车站。", "开通当天，不少市民专门前来体验。"]),
    ("service", "公交公司", "调整", "末班车时间", ["十条线路的", "夜间"],
     ["调整以后，末班车将推迟到晚上十一点发车。", "公交公司提醒市民留意车站的最新公告。"]),
    ("notice", "气象台", "发布", "暴雨预警", ["今年第一个", ""],
     ["预计未来{small}小时内，全市大部分地区将出现大雨到暴雨。", "气象部门提醒市民尽量减少外出。"]),
    ("notice", "气象台", "发布", "高温预警", ["今年第一个", ""],
     ["预计未来三天，全市最高气温将达到三十八度左右。", "气象部门提醒市民做好防暑降温。"]),
    ("activity", "博物馆", "推出", "青铜器特展", ["一场", "新一期"],
     ["展览共展出{n2}件青铜器。", "博物馆每天还安排了四场免费讲解。"]),
    ("activity", "科技馆", "举办", "机器人展览", ["一场", "暑期"],
     ["展览上，会跳舞、会下棋的机器人吸引了许多孩子。", "展览将持续到下个月底。"]),
    ("notice", "动物园", "迎来", "大熊猫宝宝", ["一只", "两只"],
     ["饲养员介绍，熊猫宝宝目前身体健康，体重已经超过{small}公斤。", "预计明年春天和游客见面。"]),
    ("notice", "消防救援支队", "开展", "防火安全检查", ["冬季", "一次"],
     ["检查的重点是商场、学校和老旧小区。", "消防人员还向居民讲解了灭火器的使用方法。"]),
    ("activity", "体育中心", "举办", "全民健身活动", ["一场", "周末"],
     ["活动设置了跳绳、踢毽子和健步走等项目。", "{n2}0多名市民参加了活动。"]),
    ("notice", "农业农村局", "推广", "水稻新品种", ["两个", "一批"],
     ["新品种比原来的品种每亩增产一百多斤。", "技术人员还到田间为农民讲解种植要点。"]),
    ("service", "环卫部门", "增加", "街道清扫次数", ["主要", "城区"],
     ["主要街道每天清扫三次。", "环卫工人表示，希望市民也能爱护环境，不乱扔垃圾。"]),
    ("notice", "师范大学", "举行", "毕业典礼", ["今年的", ""],
     ["{n3}名毕业生参加了典礼。", "校长在讲话中勉励毕业生脚踏实地，勇于追梦。"]),
    ("service", "社区服务中心", "开设", "老年人助餐点", ["{small}个", "一批"],
     ["老人在助餐点吃一顿午饭只要十几块钱。", "行动不便的老人还可以打电话预约送餐上门。"]),
    ("service", "文化馆", "开设", "免费书法课", ["一期", "周末"],
     ["课程每周六上午上课，共十二节。", "报名的市民从七岁的孩子到七十岁的老人都有。"]),
    ("notice", "青禾食品公司", "推出", "低糖月饼", ["一款", "三种"],
     ["这种月饼的含糖量比普通月饼低了一半。", "公司负责人说，产品主要面向注重健康的年轻人和老人。"]),
    ("notice", "远航科技公司", "发布", "新款手机", ["一款", "今年的"],
     ["新手机的电池可以连续使用两天。", "发布会吸引了{n2}0多名观众到场。"]),
]
# Closing sentences that fit each kind of event.
NEWS_EXTRA = {
    "activity": ["记者在现场看到，前来参加的市民络绎不绝。", "据了解，这是{city}今年举办的第{small}场同类活动。",
                 "市民{name}说：“{generic_quote}”"],
    "service": ["据了解，这是{city}今年推出的第{small}项便民措施。", "相关负责人表示，今后还将根据市民的意见不断改进。",
                "市民{name}说：“{generic_quote}”"],
    "notice": ["这条消息发布以后，很快引起了{city}市民的关注。", "相关部门提醒市民留意后续消息。",
               "{city}的多家媒体对此进行了报道。"],
}


def news_parts(rng: random.Random, city: str | None = None):
    """One news item: (headline, first sentence, detail sentences). The headline is city + org + verb + object,
    all taken from the first sentence, which is what makes lcsts-mini learnable for a tiny model."""
    kind, org, verb, obj, mods, details = rng.choice(EVENTS)
    d = new_doc(rng, obj=obj, **({"city": city} if city else {}))
    city = d["city"]
    mod = d.fill(rng.choice(mods))
    headline = f"{city}{org}{verb}{obj}"
    when = d.fill(rng.choice(["{month}月{day}日，", "{month}月{day}日上午，", "近日，", "{month}月{day}日下午，"]))
    first = f"{when}{city}{org}{verb}了{mod}{obj}。"
    detail = [d.fill(t) for t in details]
    extra = [d.fill(t) for t in rng.sample(NEWS_EXTRA[kind], 2)]
    return headline, first, detail, extra, d


def news(rng: random.Random) -> list[str]:
    headline, first, detail, extra, d = news_parts(rng)
    reporter = d.one(["记者{name}报道。", "本报记者{name}报道。", "通讯员{name}供稿。"])
    title = d.one(["{city}新闻：{obj}", "关注{city}：{obj}", "{city}本地消息：{month}月{day}日"])
    return [title, first + detail[0], detail[1] + extra[0] + extra[1] + reporter]


def news_digest(rng: random.Random) -> list[str]:
    d = new_doc(rng)
    title = d.one(["{city}新闻速览：{month}月{day}日", "{month}月{day}日{city}本地要闻", "今日{city}：本地新闻{small}条"])
    items, used = [], set()
    while len(items) < 5:
        _, first, detail, extra, item = news_parts(rng, city=d["city"])
        if item["obj"] in used:
            continue  # one item per kind of event
        # a digest does not repeat its closing lines (compared by their first words)
        closing = next((x for x in extra if x[:4] not in used), "") if len(items) % 2 == 0 else ""
        used.update((item["obj"], closing[:4]))
        # the title names the city, so the items do not repeat it
        items.append(f"{first}{detail[0]}{closing}".replace(d["city"], "", 1))
    return [title] + items


TOPICS = {"weather": weather, "cooking": cooking, "travel": travel, "school": school, "work": work,
          "science": science, "city_life": city_life, "sports": sports, "history": history, "news": news,
          "news_digest": news_digest}
