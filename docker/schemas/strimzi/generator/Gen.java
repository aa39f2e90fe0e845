// Structural JSON Schemas of Strimzi custom resource specs, generated from the Strimzi API model classes
// (Maven io.strimzi:api, Jackson-annotated POJOs) with victools jsonschema-generator. Run by build_schemas.py.
// Arguments: pairs of <spec class> <output file>.
import com.fasterxml.jackson.databind.node.ObjectNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.github.victools.jsonschema.generator.*;
import com.github.victools.jsonschema.module.jackson.JacksonModule;
import com.github.victools.jsonschema.module.jackson.JacksonOption;
import java.nio.file.*;

public class Gen {
  public static void main(String[] a) throws Exception {
    SchemaGeneratorConfigBuilder b = new SchemaGeneratorConfigBuilder(SchemaVersion.DRAFT_2020_12, OptionPreset.PLAIN_JSON);
    b.with(new JacksonModule(JacksonOption.RESPECT_JSONPROPERTY_REQUIRED, JacksonOption.FLATTENED_ENUMS_FROM_JSONVALUE,
        JacksonOption.RESPECT_JSONPROPERTY_ORDER, JacksonOption.INCLUDE_ONLY_JSONPROPERTY_ANNOTATED_METHODS));
    b.with(Option.FORBIDDEN_ADDITIONAL_PROPERTIES_BY_DEFAULT, Option.FLATTENED_ENUMS, Option.NONSTATIC_NONVOID_NONGETTER_METHODS);
    b.without(Option.NONSTATIC_NONVOID_NONGETTER_METHODS);
    b.forTypesInGeneral().withCustomDefinitionProvider((type, ctx) -> {
      String n = type.getErasedType().getName();
      if (n.equals("io.fabric8.kubernetes.api.model.Quantity") || n.equals("io.fabric8.kubernetes.api.model.IntOrString")) {
        ObjectNode o = ctx.getGeneratorConfig().createObjectNode();
        o.putArray("type").add("string").add("integer").add("number");
        return new CustomDefinition(o, true);
      }
      return null;
    });
    SchemaGenerator g = new SchemaGenerator(b.build());
    ObjectMapper m = new ObjectMapper();
    for (int i = 0; i + 1 < a.length; i += 2) {
      ObjectNode s = g.generateSchema(Class.forName(a[i]));
      Files.writeString(Path.of(a[i + 1]), m.writerWithDefaultPrettyPrinter().writeValueAsString(s));
    }
  }
}
